"""Incompressible chunks stored raw, and the restore that decodes packs whole.

Pure storage tests on the local-folder backend, in clear and encrypted: what the packs hold
(raw pages, frames, the index's flag), that every mix of them rebuilds byte for byte, that a
flipped byte in a raw chunk is refused like one in a frame, and that packs in the format
written before raw chunks existed (every chunk a frame, index `CKPTIDX1`) still read.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from storage import CorruptCheckpoint, Repository
from storage import frames as frames_module
from storage import packs as packs_module
from storage.backends import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.file_reader import CheckpointFiles
from storage.frames import FrameDecoder, FrameError
from storage.keys import index_key, pack_key
from storage.manifest import CHUNK_SIZE, DIGEST_SIZE, Manifest
from storage.packs import (
    GROUP_PAGES,
    IDX_MAGIC,
    IDX_MAGIC_V1,
    IDX_MAGIC_V2,
    IndexArrays,
    PackBuilder,
    decode_index_arrays,
    encode_index,
)

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

PAGE = CHUNK_SIZE
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def random_page() -> bytes:
    return os.urandom(PAGE)


def text_page() -> bytes:
    """Random bytes written as hex, as the benchmark's Redis values: zstd halves it."""
    nibbles = np.frombuffer(os.urandom(PAGE // 2), dtype=np.uint8)
    out = np.empty(PAGE, dtype=np.uint8)
    out[0::2], out[1::2] = _HEX[nibbles >> 4], _HEX[nibbles & 15]
    return out.tobytes()


def mixed_image(folder: Path, pages: int = 3000) -> Path:
    """Runs of random and of compressible pages, single pages of each alternating, zero
    pages, a page repeated far apart, and small files (short chunks) between them."""
    folder.mkdir(parents=True)
    repeated = random_page()
    body = []
    for i in range(pages):
        kind = (i // 37) % 4
        if kind == 0:
            body.append(random_page())
        elif kind == 1:
            body.append(text_page())
        elif kind == 2:
            body.append(random_page() if i % 2 else text_page())
        else:
            body.append(bytes(PAGE) if i % 3 else repeated)
    (folder / "pages-1.img").write_bytes(b"".join(body) + b"tail of a page")
    (folder / "core-1.img").write_bytes(os.urandom(1500))
    (folder / "mm-1.img").write_bytes(b"mm" * 3000)
    (folder / "empty.img").write_bytes(b"")
    (folder / "zeros.img").write_bytes(bytes(3 * PAGE))
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(params=["clear", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    codec = Sealed(new_master()) if request.param == "encrypted" else None
    return Repository(LocalBlobStore(tmp_path / "repo"), codec=codec)


def indexes(repo: Repository, m: Manifest) -> Iterator[tuple[str, IndexArrays]]:
    for pack_id in m.packs:
        yield pack_id, repo.read_index(pack_id, m.pack_home)


def raw_and_framed(repo: Repository, m: Manifest) -> tuple[int, int]:
    raw = framed = 0
    for _, index in indexes(repo, m):
        raw += int(index.raw.sum())
        framed += int((~index.raw).sum())
    return raw, framed


# -- the pack format ---------------------------------------------------------------------


def test_random_pages_are_stored_raw_and_compressible_ones_as_frames() -> None:
    b = PackBuilder()
    chunks = [random_page(), text_page(), bytes(PAGE), b"short" * 20, random_page(), text_page()]
    for i, c in enumerate(chunks):
        b.add(bytes([i]) * DIGEST_SIZE, c)
    pieces, encoded = b.compress(1)
    data = b"".join(pieces)
    assert encoded[:8] == IDX_MAGIC
    index = decode_index_arrays(encoded, "test")
    assert index.raw.tolist() == [True, False, False, False, True, False]
    assert index.digests == b"".join(bytes([i]) * DIGEST_SIZE for i in range(len(chunks)))
    # Raw pages first, back to back, then the frames: the text page and the zero page after
    # it share one (slots 0 and 1), the short chunk and the last text page have their own.
    assert sorted(index.offsets[index.raw].tolist()) == [0, PAGE]
    assert index.slots.tolist() == [0, 0, 1, 0, 0, 0]
    assert index.offsets[1] == index.offsets[2] and len(set(index.offsets.tolist())) == 5
    assert index.frame_pages().tolist() == [1, 2, 2, 1, 1, 1]
    for i, chunk in enumerate(chunks):
        o, n = int(index.offsets[i]), int(index.lengths[i])
        stored = data[o : o + n]
        if index.raw[i]:
            assert stored == chunk
        else:
            at = int(index.slots[i]) * PAGE
            assert zstandard.ZstdDecompressor().decompress(stored)[at : at + len(chunk)] == chunk
            assert n < len(chunk) * (2 if i in (1, 2) else 1)
    frames = {(int(o), int(n)) for o, n in zip(index.offsets, index.lengths, strict=True)}
    assert len(data) == sum(n for _, n in frames)


def test_compressible_pages_back_to_back_share_frames_of_sixteen() -> None:
    """40 text pages in a row: frames of 16, 16 and 8 pages, each page at its slot."""
    b = PackBuilder()
    pages = [text_page() for _ in range(40)]
    for i, c in enumerate(pages):
        b.add(i.to_bytes(2, "big") * (DIGEST_SIZE // 2), c)
    pieces, encoded = b.compress(1)
    data = b"".join(pieces)
    index = decode_index_arrays(encoded, "test")
    assert GROUP_PAGES == 16
    assert index.slots.tolist() == [*range(16), *range(16), *range(8)]
    assert index.frame_pages().tolist() == [16] * 32 + [8] * 8
    assert len(set(index.offsets.tolist())) == 3 and not index.raw.any()
    for i, page in enumerate(pages):
        o, n, at = int(index.offsets[i]), int(index.lengths[i]), int(index.slots[i]) * PAGE
        assert zstandard.ZstdDecompressor().decompress(data[o : o + n])[at : at + PAGE] == page
    assert len(data) < 40 * PAGE * 0.6


def test_a_page_that_passes_the_sample_but_does_not_shrink_is_stored_raw() -> None:
    """Compressible where the sample looks (every 512th byte run), random elsewhere: zstd is
    tried on the whole page, does not win a sixteenth, and the page is kept raw."""
    page = bytearray(os.urandom(PAGE))
    for start in range(0, PAGE, 512):
        page[start : start + 32] = bytes(32)
    b = PackBuilder()
    b.add(b"\x01" * DIGEST_SIZE, bytes(page))
    pieces, encoded = b.compress(1)
    index = decode_index_arrays(encoded, "test")
    assert index.raw.tolist() == [True]
    assert b"".join(pieces) == bytes(page)


def test_the_index_flag_is_the_top_bit_of_the_length_and_the_slot_follows() -> None:
    encoded = encode_index(
        b"\xaa" * 32 + b"\xbb" * 32, [0, 4096], [4096, 77], [True, False], [0, 3]
    )
    assert encoded == (
        b"CKPTIDX3"
        + struct.pack("<I", 2)
        + b"\xaa" * 32
        + struct.pack("<IIH", 0, 4096 | 1 << 31, 0)
        + b"\xbb" * 32
        + struct.pack("<IIH", 4096, 77, 3)
    )
    index = decode_index_arrays(encoded, "test")
    assert index.lengths.tolist() == [4096, 77] and index.raw.tolist() == [True, False]
    assert index.slots.tolist() == [0, 3]


def test_older_indexes_read_with_every_frame_one_chunk() -> None:
    """CKPTIDX1 (no raw chunks) and CKPTIDX2 (raw chunks, no slots): a frame per chunk."""
    v1 = IDX_MAGIC_V1 + struct.pack("<I", 1) + b"\xcc" * 32 + struct.pack("<II", 0, 4106)
    index = decode_index_arrays(v1, "test")
    assert index.raw.tolist() == [False] and index.lengths.tolist() == [4106]
    assert index.slots.tolist() == [0] and index.frame_pages().tolist() == [1]
    v2 = IDX_MAGIC_V2 + struct.pack("<I", 2) + b"\xcc" * 32 + struct.pack("<II", 0, 4096 | 1 << 31)
    v2 += b"\xdd" * 32 + struct.pack("<II", 4096, 900)
    index = decode_index_arrays(v2, "test")
    assert index.raw.tolist() == [True, False] and index.lengths.tolist() == [4096, 900]
    assert index.slots.tolist() == [0, 0]
    with pytest.raises(CorruptCheckpoint, match="bad header"):
        decode_index_arrays(b"CKPTIDX9" + v1[8:], "test")
    for damaged in (v1[:-1], v2[:-1], IDX_MAGIC + v1[8:]):  # v3 entries are 2 bytes longer
        with pytest.raises(CorruptCheckpoint, match="truncated"):
            decode_index_arrays(damaged, "test")


@pytest.mark.parametrize("slots", [[16], [1]], ids=["past-a-frame", "on-a-raw-chunk"])
def test_a_slot_out_of_range_is_refused(slots: list[int]) -> None:
    raw = [slots == [1]]
    encoded = encode_index(b"\xaa" * 32, [0], [4096], raw, slots)
    with pytest.raises(CorruptCheckpoint, match="slot out of range"):
        decode_index_arrays(encoded, "test")


@pytest.mark.parametrize("use_libzstd", [True, False])
def test_frames_decode_back_to_back_into_a_buffer_and_bad_ones_are_refused(
    use_libzstd: bool,
) -> None:
    chunks = [text_page(), bytes(PAGE), b"x" * 100]
    frames = [zstandard.ZstdCompressor(level=1).compress(c) for c in chunks]
    src = b"".join(frames)
    lengths = np.array([len(f) for f in frames], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    sizes = np.array([len(c) for c in chunks], dtype=np.int64)
    dst = bytearray(10 + int(sizes.sum()))
    FrameDecoder(use_libzstd).decode_into(dst, 10, src, offsets, lengths, sizes)
    assert bytes(dst[10:]) == b"".join(chunks)
    damaged = bytearray(src)
    damaged[5] ^= 0xFF
    with pytest.raises(FrameError):
        FrameDecoder(use_libzstd).decode_into(
            bytearray(len(dst)), 0, bytes(damaged), offsets, lengths, sizes
        )
    with pytest.raises(FrameError):  # the frames hold more than the sizes say
        FrameDecoder(use_libzstd).decode_into(dst, 0, src, offsets, lengths, sizes - 1)


# -- round trips -------------------------------------------------------------------------


def test_mixed_pages_round_trip_byte_for_byte(repo: Repository, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src")
    m = repo.commit("w", src)
    raw, framed = raw_and_framed(repo, m)
    assert raw > 1000 and framed > 1000
    assert len(m.packs) >= 2
    out = tmp_path / "out"
    done: list[int] = []
    repo.materialize("w", m.id, out, done.append)
    assert files_of(out) == files_of(src)
    assert sum(done) == sum(len(b) for b in files_of(src).values())


@pytest.mark.parametrize("run", [1, 3, 20])
def test_runs_of_random_and_compressible_pages_round_trip(
    repo: Repository, tmp_path: Path, run: int
) -> None:
    """Runs of each kind, every page once: long runs are decoded straight into file order,
    single alternating pages are decoded in stored order and gathered; both are exact."""
    src = tmp_path / "src"
    src.mkdir()
    pages = [random_page() if i // run % 2 else text_page() for i in range(2500)]
    (src / "pages-1.img").write_bytes(b"".join(pages))
    (src / "core-1.img").write_bytes(os.urandom(700))
    m = repo.commit("w", src)
    assert min(raw_and_framed(repo, m)) > 1000
    repo.materialize("w", m.id, tmp_path / "out")
    assert files_of(tmp_path / "out") == files_of(src)


def test_a_later_checkpoint_rebuilt_from_packs_of_several_commits(
    repo: Repository, tmp_path: Path
) -> None:
    """The second checkpoint takes most pages from the first one's packs (not all of each)
    and the changed ones from its own: chunks in file order come from interleaved packs."""
    src = mixed_image(tmp_path / "src")
    first = repo.commit("w", src)
    with open(src / "pages-1.img", "r+b") as f:
        for i in range(0, 3000, 13):
            f.seek(i * PAGE)
            f.write(random_page() if i % 2 else text_page())
    second = repo.commit("w", src)
    assert set(first.packs) & set(second.packs)
    out = tmp_path / "out"
    repo.materialize("w", second.id, out)
    assert files_of(out) == files_of(src)


def test_zero_pages_are_not_fetched_and_read_back_as_zeros(tmp_path: Path) -> None:
    class Counting(LocalBlobStore):
        packs_read = 0

        def get_into(self, key, buffer, limit=None):  # type: ignore[no-untyped-def]
            Counting.packs_read += key.endswith(".pack")
            return super().get_into(key, buffer, limit)

    repo = Repository(Counting(tmp_path / "repo"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(bytes(50 * PAGE))
    m = repo.commit("w", src)
    out = tmp_path / "out"
    repo.materialize("w", m.id, out)
    assert (out / "pages-1.img").read_bytes() == bytes(50 * PAGE)
    assert Counting.packs_read == 0
    assert os.stat(out / "pages-1.img").st_blocks == 0  # nothing written: a hole


def test_frames_decode_without_the_libzstd_module_too(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frames_module, "_lib", None)
    src = mixed_image(tmp_path / "src", pages=600)
    m = repo.commit("w", src)
    repo.materialize("w", m.id, tmp_path / "out")
    assert files_of(tmp_path / "out") == files_of(src)


# -- damage --------------------------------------------------------------------------------


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(data))


def stored_chunk(repo: Repository, m: Manifest, raw: bool) -> tuple[str, int]:
    """A pack and an offset (in the pack's plaintext) in the middle of its largest raw chunk
    or frame (never a zero page's frame, which a restore does not need)."""
    for pack_id, index in indexes(repo, m):
        kind = index.raw == raw
        if kind.any():
            k = int(np.flatnonzero(kind)[np.argmax(index.lengths[kind])])
            return pack_id, int(index.offsets[k]) + int(index.lengths[k]) // 2
    raise AssertionError("no such chunk")


@pytest.mark.parametrize("kind", ["raw", "frame"])
def test_a_flipped_byte_in_a_raw_chunk_or_a_frame_is_refused(
    repo: Repository, tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    page = random_page if kind == "raw" else text_page
    (src / "pages-1.img").write_bytes(b"".join(page() for _ in range(64)))
    m = repo.commit("w", src)
    pack_id, offset = stored_chunk(repo, m, raw=kind == "raw")
    header = 0 if not repo.codec.encrypted else 21  # CKPTSEAL, format, nonce
    flip(tmp_path / "repo" / pack_key(pack_id, "w"), header + offset)
    with pytest.raises(CorruptCheckpoint) as err:
        repo.materialize("w", m.id, tmp_path / "out")
    assert m.id in str(err.value)
    expected = "fails authentication" if repo.codec.encrypted else "corrupt"
    assert expected in str(err.value)


def test_a_raw_flag_on_a_chunk_of_another_size_is_refused(tmp_path: Path) -> None:
    """In clear, whoever can write the folder can write an index: a raw entry must be
    exactly its chunk's size."""
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(random_page() + random_page())
    m = repo.commit("w", src)
    path = tmp_path / "repo" / index_key(m.packs[0], m.pack_home)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 12 + 36, 4000 | 1 << 31)  # first entry: length 4000, raw
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="wrong size"):
        repo.materialize("w", m.id, tmp_path / "out")


# -- repositories written before raw chunks ------------------------------------------------


def old_compress(self: PackBuilder, level: int) -> tuple[list[bytes], bytes]:
    """PackBuilder.compress as it was before raw chunks: a zstd frame per chunk, in the
    order added, and a CKPTIDX1 index (digest, offset, frame length per chunk)."""
    segments = self._segments.tobytes()
    frames = zstandard.ZstdCompressor(level=level).multi_compress_to_buffer(
        zstandard.BufferWithSegments(self.raw, segments), threads=1
    )
    lengths = [len(frames[i]) for i in range(len(frames))]
    offsets = list(itertools.accumulate(lengths, initial=0))[:-1]
    out = bytearray(IDX_MAGIC_V1 + struct.pack("<I", len(offsets)))
    for i, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        out += self.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        out += struct.pack("<II", offset, length)
    return [b"".join(frames[i] for i in range(len(frames)))], bytes(out)  # type: ignore[misc]


def test_a_repository_written_before_raw_chunks_still_reads(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = mixed_image(tmp_path / "src")
    with monkeypatch.context() as patch:
        patch.setattr(PackBuilder, "compress", old_compress)
        old = repo.commit("w", src)
    for pack_id in old.packs:
        raw = (tmp_path / "repo" / index_key(pack_id, "w")).read_bytes()
        assert repo.codec.encrypted or raw[:8] == IDX_MAGIC_V1
    assert raw_and_framed(repo, old)[0] == 0
    out = tmp_path / "out"
    repo.materialize("w", old.id, out)
    assert files_of(out) == files_of(src)
    # A new checkpoint dedups against the old packs and mixes both formats.
    with open(src / "pages-1.img", "r+b") as f:
        f.seek(100 * PAGE)
        f.write(random_page() * 3)
    new = repo.commit("w", src)
    assert new.new_chunks == 1 and set(old.packs) < set(new.packs)
    repo.materialize("w", new.id, tmp_path / "out2")
    assert files_of(tmp_path / "out2") == files_of(src)
    # And a flipped byte in an old frame is still refused.
    pack_id, offset = stored_chunk(repo, old, raw=False)
    flip(tmp_path / "repo" / pack_key(pack_id, "w"), (21 if repo.codec.encrypted else 0) + offset)
    with pytest.raises(CorruptCheckpoint):
        repo.materialize("w", old.id, tmp_path / "out3")


# -- repositories written before frames of several pages -----------------------------------


def v2_compress(self: PackBuilder, level: int) -> tuple[list[Any], bytes]:
    """PackBuilder.compress as it was before frames of several pages: raw chunks, then a
    frame per chunk, and a CKPTIDX2 index (the same entries without their slot). Run with
    GROUP_PAGES at 1."""
    pieces, encoded = _compress(self, level)
    index = decode_index_arrays(encoded, "v2")
    assert not index.slots.any()
    length = index.lengths | (index.raw.astype(np.uint32) << np.uint32(31))
    out = bytearray(IDX_MAGIC_V2 + struct.pack("<I", len(length)))
    for i in range(len(length)):
        out += index.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        out += struct.pack("<II", int(index.offsets[i]), int(length[i]))
    return pieces, bytes(out)


_compress = PackBuilder.compress


def test_a_repository_of_one_chunk_frames_still_reads(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packs written before frames of several pages (CKPTIDX2) rebuild, lazily read, and a
    new checkpoint dedups against them, mixing both formats in one restore."""
    src = mixed_image(tmp_path / "src")
    with monkeypatch.context() as patch:
        patch.setattr(PackBuilder, "compress", v2_compress)
        patch.setattr(packs_module, "GROUP_PAGES", 1)
        old = repo.commit("w", src)
    for pack_id in old.packs:
        raw = (tmp_path / "repo" / index_key(pack_id, "w")).read_bytes()
        assert repo.codec.encrypted or raw[:8] == IDX_MAGIC_V2
    repo.materialize("w", old.id, tmp_path / "out")
    assert files_of(tmp_path / "out") == files_of(src)
    with open(src / "pages-1.img", "r+b") as f:
        f.seek(40 * PAGE)
        f.write(b"".join(text_page() for _ in range(40)))
    new = repo.commit("w", src)
    assert new.new_chunks == 40 and set(old.packs) < set(new.packs)
    repo.materialize("w", new.id, tmp_path / "out2")
    assert files_of(tmp_path / "out2") == files_of(src)
    files = CheckpointFiles(repo, "w", new.id)
    pages = (src / "pages-1.img").read_bytes()
    assert files.read("pages-1.img", 30 * PAGE, 60 * PAGE) == pages[30 * PAGE : 90 * PAGE]


def test_an_index_whose_slots_disagree_with_its_frame_is_refused(tmp_path: Path) -> None:
    """In clear, whoever can write the folder can write an index: a frame of 16 pages whose
    entries say 15 does not decode to what they say, and neither a restore nor a lazy read
    returns its pages."""
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(b"".join(text_page() for _ in range(16)))
    m = repo.commit("w", src)
    path = tmp_path / "repo" / index_key(m.packs[0], m.pack_home)
    raw = bytearray(path.read_bytes())
    assert raw[:8] == IDX_MAGIC
    entry = 32 + 4 + 4 + 2
    last = 12 + 15 * entry + 40  # the slot of the 16th page
    assert struct.unpack_from("<H", raw, last) == (15,)
    struct.pack_into("<H", raw, last, 14)
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=r"does not decompress|not .* bytes"):
        repo.materialize("w", m.id, tmp_path / "out")
    with pytest.raises(CorruptCheckpoint, match=r"not .* bytes|does not match"):
        CheckpointFiles(repo, "w", m.id).read("pages-1.img", 0, 16 * PAGE)
