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

import numpy as np
import pytest
import zstandard

from storage import CorruptCheckpoint, Repository
from storage import frames as frames_module
from storage.backends import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.frames import FrameDecoder, FrameError
from storage.keys import index_key, pack_key
from storage.manifest import CHUNK_SIZE, DIGEST_SIZE, Manifest
from storage.packs import (
    IDX_MAGIC,
    IDX_MAGIC_V1,
    IndexArrays,
    PackBuilder,
    decode_index_arrays,
    encode_index,
)

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
        yield pack_id, repo.read_index(pack_id)


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
    # Raw pages first, back to back, then the frames.
    assert sorted(index.offsets[index.raw].tolist()) == [0, PAGE]
    for i, chunk in enumerate(chunks):
        o, n = int(index.offsets[i]), int(index.lengths[i])
        stored = data[o : o + n]
        if index.raw[i]:
            assert stored == chunk
        else:
            assert zstandard.ZstdDecompressor().decompress(stored) == chunk
            assert n < len(chunk)
    assert len(data) == sum(index.lengths.tolist())


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


def test_the_index_flag_is_the_top_bit_of_the_length() -> None:
    encoded = encode_index(b"\xaa" * 32 + b"\xbb" * 32, [0, 4096], [4096, 77], [True, False])
    assert encoded == (
        b"CKPTIDX2"
        + struct.pack("<I", 2)
        + b"\xaa" * 32
        + struct.pack("<II", 0, 4096 | 1 << 31)
        + b"\xbb" * 32
        + struct.pack("<II", 4096, 77)
    )
    index = decode_index_arrays(encoded, "test")
    assert index.lengths.tolist() == [4096, 77] and index.raw.tolist() == [True, False]


def test_an_index_written_before_raw_chunks_reads_with_no_chunk_raw() -> None:
    """CKPTIDX1 had the same entries; a length's top bit never meant anything there."""
    old = IDX_MAGIC_V1 + struct.pack("<I", 1) + b"\xcc" * 32 + struct.pack("<II", 0, 4106)
    index = decode_index_arrays(old, "test")
    assert index.raw.tolist() == [False] and index.lengths.tolist() == [4106]
    with pytest.raises(CorruptCheckpoint, match="bad header"):
        decode_index_arrays(b"CKPTIDX3" + old[8:], "test")
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        decode_index_arrays(old[:-1], "test")


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
    flip(tmp_path / "repo" / pack_key(pack_id), header + offset)
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
    path = tmp_path / "repo" / index_key(m.packs[0])
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
        raw = (tmp_path / "repo" / index_key(pack_id)).read_bytes()
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
    flip(tmp_path / "repo" / pack_key(pack_id), (21 if repo.codec.encrypted else 0) + offset)
    with pytest.raises(CorruptCheckpoint):
        repo.materialize("w", old.id, tmp_path / "out3")
