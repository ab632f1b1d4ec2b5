"""Ranges of a checkpointed file read straight from the packs (the lazy restore's pages):
the same bytes as the file, in clear and sealed repositories, and a flipped byte refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import Repository
from storage.backends.local import LocalBlobStore
from storage.chunk_index import ChunkIndex
from storage.crypto import SEGMENT, SEGMENTED_HEADER, Sealed, new_master
from storage.errors import CorruptCheckpoint
from storage.file_reader import CheckpointFiles

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def folder(path: Path) -> Path:
    path.mkdir()
    page = os.urandom(4096)
    # random pages, compressible pages, a repeated page, zero pages and a short tail
    data = os.urandom(300 * 4096) + b"x" * 200 * 4096 + page * 30 + bytes(40 * 4096) + b"end"
    (path / "pages-1.img").write_bytes(data)
    (path / "core-1.img").write_bytes(b"core" * 100)
    return path


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_ranges_read_back_exactly_what_was_stored(tmp_path: Path, sealed: bool) -> None:
    src = folder(tmp_path / "src")
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    files = CheckpointFiles(repo, "w", m.id)
    data = (src / "pages-1.img").read_bytes()
    for offset, length in ((0, 4096), (4096 * 299, 3 * 4096), (4096 * 500, 64 * 4096),
                           (len(data) - 4099, 4096 * 4), (123, 5000), (0, len(data))):  # fmt: skip
        assert files.read("pages-1.img", offset, length) == data[offset : offset + length]
    assert files.read("core-1.img", 0, 400) == b"core" * 100
    assert files.size("pages-1.img") == len(data)


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_a_flipped_byte_in_a_pack_is_refused_not_returned(tmp_path: Path, sealed: bool) -> None:
    src = folder(tmp_path / "src")
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    packs = sorted((tmp_path / "repo").rglob("*.pack"))
    assert packs
    for pack in packs:
        raw = bytearray(pack.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        pack.write_bytes(bytes(raw))
    files = CheckpointFiles(repo, "w", m.id)
    with pytest.raises(CorruptCheckpoint):
        for offset in range(0, files.size("pages-1.img"), 64 * 4096):
            files.read("pages-1.img", offset, 64 * 4096)


class CountingStore(LocalBlobStore):
    """Counts the pack indexes read."""

    indexes_read = 0

    def get(self, key: str, limit: int | None = None) -> bytes:
        CountingStore.indexes_read += key.endswith(".idx")
        return super().get(key, limit)


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_with_hints_a_small_read_reads_only_its_packs_indexes(tmp_path: Path, sealed: bool) -> None:
    """A daemon that has committed knows which pack holds each chunk: the first small reads
    of a lazy restore (its small images) read one or two indexes, not all of them, and a
    whole file is still located with every index, returning the same bytes."""
    src = folder(tmp_path / "src")
    (src / "pages-1.img").write_bytes(os.urandom(3000 * 4096))  # ~12 MB: three packs or more
    codec = Sealed(new_master()) if sealed else None
    store = CountingStore(tmp_path / "repo")
    repo = Repository(store, **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    assert len(m.packs) >= 3
    hints = repo.known_chunks("w")
    assert hints is not None
    CountingStore.indexes_read = 0
    files = CheckpointFiles(repo, "w", m.id, hints)
    assert files.read("core-1.img", 0, 400) == b"core" * 100
    data = (src / "pages-1.img").read_bytes()
    assert files.read("pages-1.img", 4096 * 10, 4096 * 3) == data[4096 * 10 : 4096 * 13]
    assert CountingStore.indexes_read <= 2
    assert files.read("pages-1.img", 0, len(data)) == data  # the whole file: every index
    assert CountingStore.indexes_read == len(m.packs)


def test_a_hint_that_names_the_wrong_pack_still_finds_the_right_chunk(tmp_path: Path) -> None:
    """Hints are never trusted: an index that says every chunk is in the wrong pack (or a
    pack of another checkpoint) only costs the search of every index."""
    src = folder(tmp_path / "src")
    (src / "pages-1.img").write_bytes(os.urandom(2000 * 4096))
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    m = repo.commit("w", src)
    first = next(f for f in m.files if f.name == "pages-1.img").digests[:32]
    elsewhere = next(p for p in m.packs if first not in repo.read_index(p, m.pack_home).digests)
    wrong = ChunkIndex()
    everything = b"".join(f.digests for f in m.files)
    wrong.add(elsewhere, everything)  # every chunk said to be in a pack without the first
    wrong.add("0" * 32, bytes(32))  # and one in a pack that is not this checkpoint's
    files = CheckpointFiles(repo, "w", m.id, wrong)
    data = (src / "pages-1.img").read_bytes()
    assert files.read("pages-1.img", 0, 4096 * 5) == data[: 4096 * 5]
    assert files.read("core-1.img", 0, 400) == b"core" * 100


class RangeCountingStore(LocalBlobStore):
    """Counts what is read of packs, whole or by range."""

    pack_bytes = 0

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        data, size = super().get_range(key, offset, length)
        RangeCountingStore.pack_bytes += len(data) * key.endswith(".pack")
        return data, size

    def get(self, key: str, limit: int | None = None) -> bytes:
        data = super().get(key, limit)
        RangeCountingStore.pack_bytes += len(data) * key.endswith(".pack")
        return data


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_a_page_is_read_from_its_segment_not_its_whole_pack(tmp_path: Path, sealed: bool) -> None:
    """A lazy restore's page fault reads the 64 KiB segment (or two) that holds its chunk,
    not the 4 MiB pack, and it is still checked (a flipped bit in another segment of the
    same pack goes unread; one in its own segment is refused)."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(1000 * 4096)
    (src / "pages-1.img").write_bytes(data)
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(RangeCountingStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    files = CheckpointFiles(repo, "w", m.id, repo.known_chunks("w"))
    RangeCountingStore.pack_bytes = 0
    assert files.read("pages-1.img", 500 * 4096, 4096) == data[500 * 4096 : 501 * 4096]
    assert 0 < RangeCountingStore.pack_bytes <= 2 * (SEGMENT + 16) + SEGMENTED_HEADER
    (pack,) = (tmp_path / "repo").rglob("*.pack")
    raw = bytearray(pack.read_bytes())
    raw[len(raw) - 100] ^= 0x01  # the last segment: pages near the end
    pack.chmod(0o600)
    pack.write_bytes(bytes(raw))
    fresh = CheckpointFiles(repo, "w", m.id, repo.known_chunks("w"))
    assert fresh.read("pages-1.img", 0, 4096) == data[:4096]
    with pytest.raises(CorruptCheckpoint):
        fresh.read("pages-1.img", len(data) - 4096, 4096)


def test_packs_sealed_whole_before_segments_still_read_and_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = folder(tmp_path / "src")
    repo = Repository(LocalBlobStore(tmp_path / "repo"), codec=Sealed(new_master()))
    with monkeypatch.context() as patch:
        patch.setattr(
            Sealed, "seal_pack", lambda self, name, pieces, size: self.seal_stream(name, pieces)
        )
        m = repo.commit("w", src)
    data = (src / "pages-1.img").read_bytes()
    files = CheckpointFiles(repo, "w", m.id, repo.known_chunks("w"))
    assert files.read("pages-1.img", 4096 * 299, 3 * 4096) == data[4096 * 299 : 4096 * 302]
    assert files.read("pages-1.img", 0, len(data)) == data
    repo.materialize("w", m.id, tmp_path / "out")
    assert (tmp_path / "out" / "pages-1.img").read_bytes() == data


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_deduplicated_pages_interleaved_with_others_read_back_exactly(
    tmp_path: Path, sealed: bool
) -> None:
    """Every third page the same (its one chunk in another pack than its neighbours), the
    others half compressible: a read alternates packs and frames at each page. One commit
    (a pack per 4 MiB) then a second that shares the repeated page with the first."""
    src = tmp_path / "src"
    src.mkdir()
    same = os.urandom(2048) + bytes(2048)
    pages = [same if i % 3 == 0 else os.urandom(2048) + bytes(2048) for i in range(3000)]
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    (src / "pages-1.img").write_bytes(same * 5)
    repo.commit("w", src)
    data = b"".join(pages)
    (src / "pages-1.img").write_bytes(data)
    m = repo.commit("w", src)
    files = CheckpointFiles(repo, "w", m.id)
    for offset, length in ((0, len(data)), (4096 * 7, 4096 * 200), (4096 * 2999, 4096)):
        assert files.read("pages-1.img", offset, length) == data[offset : offset + length]


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_an_empty_file_and_a_read_at_the_end_return_no_bytes(tmp_path: Path, sealed: bool) -> None:
    """A lazy restore writes every small image with read(name, 0, size): an empty one is
    b"", as a read at a file's end (was, sealed: IndexError out of the run loop, a restore's
    'internal error' instead of its bytes)."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(8 * 4096)  # a whole number of chunks: its end starts no chunk
    (src / "pages-1.img").write_bytes(data)
    (src / "empty.img").write_bytes(b"")
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    files = CheckpointFiles(repo, "w", m.id)
    assert files.read("empty.img", 0, files.size("empty.img")) == b""
    assert files.read("pages-1.img", len(data), 4096) == b""
    assert files.read("pages-1.img", 4096, 0) == b""
    assert files.read("pages-1.img", 4096, 4096) == data[4096:8192]
