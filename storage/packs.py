"""Packs: many small chunks in one blob, with a separate index blob.

Memory images change page by page, scattered (DESIGN.md: 1% of Redis keys rewritten touches
8.4% of 4 KiB pages), so chunks are small. Storing each as its own object would cost tens of
thousands of objects per checkpoint; packs keep it to a handful. The index is written after
its pack, so an index always names a complete pack; a pack without an index is garbage.

A chunk is stored in a zstd frame, or raw (its bytes as they are) when zstd would not shrink
it by a sixteenth: random memory (encrypted or compressed data, hash tables of random keys)
does not compress, and trying costs more than hashing it (zstd -1 ran at ~590 MB/s on random
4 KiB pages here, BLAKE3 at ~1.4 GB/s). Whether to try is decided from a 256-byte sample of the
page, spread over it, compressed in one batch call (~0.35 s per GB of random pages); a page
that passes the sample but not the full try is stored raw too. A pack holds its raw chunks
first, then its frames: a restore copies the raw run and decodes the frame run in one call
each, however finely random and compressible pages alternate.

A frame holds up to GROUP_PAGES whole pages that lie back to back in the pack's buffer (the
pages of a file in order, for a first checkpoint), a short chunk (a file's last) a frame of
its own. Chunks stay 4 KiB for dedup; only the compression unit grows. zstd decoded the
benchmark's hex pages at 0.84 GB/s in 4 KiB frames and 1.68 GB/s in 64 KiB ones (the
per-frame header and Huffman table were half the work), and a restore decodes every byte.
Reading one page then decodes its frame's 64 KiB (~40 us): nothing next to a fault's trip.

Index format (all little-endian): the magic, a u32 count, then per chunk its 32-byte digest,
a u32 offset in the pack, a u32 whose low 31 bits are the stored length and whose top bit
says "stored raw", and (`CKPTIDX3`) a u16 slot: the page's place in its frame. A raw chunk's
stored length is its size; a framed chunk's offset and length are its frame's, shared by the
pages in it. `CKPTIDX2` (one chunk a frame) has no slot; `CKPTIDX1` (written before raw chunks
existed) neither slot nor raw chunk. All three are read.
"""

from __future__ import annotations

import array
import itertools
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from storage.errors import CorruptCheckpoint
from storage.manifest import CHUNK_SIZE, DIGEST_SIZE

Piece = Any  # memoryview, or a zstd BufferSegment (buffer protocol, no typing of its own)

# Three pack buffers live at once (one filling, two compressing and storing), so the pack size
# sets most of a checkpoint's memory. Measured on 1 GB of Redis pages in the daemon: 8 MiB packs
# were 7% faster than 4 MiB but peaked 17 MB higher.
PACK_TARGET_BYTES = 4 * 1024 * 1024
_SLACK = 64 * 1024  # room past the target for the chunk that fills a pack
# Many tiny chunks (small image files) would make an index big: a pack closes at this many.
MAX_PACK_CHUNKS = 1 << 16
IDX_MAGIC_V1 = b"CKPTIDX1"  # every chunk a zstd frame
IDX_MAGIC_V2 = b"CKPTIDX2"  # the top bit of a length flags a raw chunk
IDX_MAGIC = b"CKPTIDX3"  # and a frame holds several pages, each entry its slot
RAW_FLAG = 1 << 31
GROUP_PAGES = 16  # whole pages in one frame at most (64 KiB)
# digest, offset, stored length (| RAW_FLAG): versions 1 and 2; version 3 adds a u16 slot
_IDX_DTYPE_V2 = np.dtype([("digest", f"V{DIGEST_SIZE}"), ("offset", "<u4"), ("length", "<u4")])
_IDX_DTYPE = np.dtype(
    [("digest", f"V{DIGEST_SIZE}"), ("offset", "<u4"), ("length", "<u4"), ("slot", "<u2")]
)
# What a reader accepts before reading a blob whole (a bucket writer picks sizes). Packs of the
# first releases were 16 MiB; incompressible frames are a little larger than their chunks.
MAX_PACK_BYTES = 64 * 1024 * 1024
MAX_INDEX_BYTES = 1024 + MAX_PACK_CHUNKS * _IDX_DTYPE.itemsize + 1024
# The sample: 8 pieces of 32 bytes, one every 512 bytes of the page. zstd -1 shrank such
# samples of random pages to 104% of their size and of hex text (the benchmark's Redis values)
# to 64%; below 15/16 the whole page is tried.
_SAMPLE_PIECES, _SAMPLE_PIECE = 8, 32
_SAMPLE_BYTES = _SAMPLE_PIECES * _SAMPLE_PIECE
_SAMPLE_KEEP = _SAMPLE_BYTES * 15 // 16
_PIECE_STARTS = np.arange(_SAMPLE_PIECES, dtype=np.int64) * (CHUNK_SIZE // _SAMPLE_PIECES)


def new_pack_id(now: float | None = None) -> str:
    """Creation time (hex seconds; `now`, default the wall clock) then randomness: garbage
    collection reads a pack's age from its name, which works the same on every backend."""
    return f"{int(time.time() if now is None else now):08x}{secrets.token_hex(12)}"


def pack_created(pack_id: str) -> float:
    try:
        return float(int(pack_id[:8], 16))
    except ValueError:
        return 0.0


def encode_index(
    digests: bytes,
    offsets: Sequence[int] | npt.NDArray[np.integer],
    lengths: Sequence[int] | npt.NDArray[np.integer],
    raw: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
    slots: Sequence[int] | npt.NDArray[np.integer] | None = None,
) -> bytes:
    """The index of a pack: each chunk's digest with where it lies in the pack, whether it
    is stored raw and its slot in its frame (see the module's docstring for the bytes)."""
    n = len(offsets)
    entries = np.zeros(n, dtype=_IDX_DTYPE)
    entries["digest"] = np.frombuffer(digests, dtype=f"V{DIGEST_SIZE}", count=n)
    entries["offset"] = offsets
    length = np.asarray(lengths, dtype=np.uint32)
    if raw is not None:
        length = length | (np.asarray(raw, dtype=np.uint32) << np.uint32(31))
    entries["length"] = length
    if slots is not None:
        entries["slot"] = slots
    return IDX_MAGIC + struct.pack("<I", n) + entries.tobytes()


@dataclass(frozen=True)
class IndexArrays:
    """A pack index as arrays: digests concatenated, offsets, stored lengths, raw flags, and
    each framed chunk's slot in its frame (0 in the formats without slots)."""

    digests: bytes
    offsets: npt.NDArray[np.uint32]
    lengths: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.bool_]
    slots: npt.NDArray[np.uint16]

    def frame_pages(self) -> npt.NDArray[np.int64]:
        """How many pages the frame of each entry decodes to: one more than the highest slot
        of the entries that share its offset (1 for a raw chunk). What a frame really holds
        is checked when it is decoded: it must come out at exactly this many pages."""
        pages = np.ones(len(self.offsets), dtype=np.int64)
        framed = np.flatnonzero(~self.raw)
        if len(framed):
            _, inverse = np.unique(self.offsets[framed], return_inverse=True)
            top = np.zeros(int(inverse.max()) + 1, dtype=np.int64)
            np.maximum.at(top, inverse, self.slots[framed].astype(np.int64))
            pages[framed] = top[inverse] + 1
        return pages


def decode_index_arrays(raw: bytes, where: str) -> IndexArrays:
    """The index without a Python object per chunk (restores and index loads use this)."""
    magic = raw[: len(IDX_MAGIC)]
    dtype = _IDX_DTYPE if magic == IDX_MAGIC else _IDX_DTYPE_V2
    if magic not in (IDX_MAGIC, IDX_MAGIC_V2, IDX_MAGIC_V1) or len(raw) < len(IDX_MAGIC) + 4:
        raise CorruptCheckpoint(f"pack index {where} is damaged (bad header)")
    (count,) = struct.unpack_from("<I", raw, len(IDX_MAGIC))
    start = len(IDX_MAGIC) + 4
    if len(raw) != start + count * dtype.itemsize:
        raise CorruptCheckpoint(f"pack index {where} is damaged (truncated)")
    entries = np.frombuffer(memoryview(raw)[start:], dtype=dtype)
    field = entries["length"]
    if magic == IDX_MAGIC_V1:
        flags = np.zeros(len(field), dtype=bool)
    else:
        flags = (field >> np.uint32(31)).astype(bool)
    if magic == IDX_MAGIC:
        slots = entries["slot"].astype(np.uint16)
        if (slots[~flags] >= GROUP_PAGES).any() or slots[flags].any():
            raise CorruptCheckpoint(f"pack index {where} is damaged (a slot out of range)")
    else:
        slots = np.zeros(len(field), dtype=np.uint16)
    return IndexArrays(
        entries["digest"].tobytes(),
        entries["offset"].astype(np.uint32),
        (field & np.uint32(RAW_FLAG - 1)).astype(np.uint32),
        flags,
        slots,
    )


class PackBuilder:
    """Collects new chunks until the pack is big enough, then packs them all at once.

    Chunks are copied into one buffer (no object per chunk); sampling, compressing (zstd's
    multi_compress_to_buffer, a frame per chunk) and laying out run as a few batch calls
    without the GIL in a writer thread, so the next pack's chunks are hashed meanwhile. One
    thread per pack, two packs in flight: measured faster on two cores than zstd's own
    threads, which fight the hashing thread.
    """

    def __init__(self, spare: list[bytearray] | None = None, now: float | None = None) -> None:
        self.pack_id = new_pack_id(now)
        self.digests = bytearray()
        # A buffer of a sealed pack is reused: a fresh 4 MiB costs more in page faults than
        # the copying into it, and growing chunk by chunk reallocates.
        self._spare = spare if spare is not None else []
        try:
            self.raw = self._spare.pop()
        except IndexError:
            self.raw = bytearray(PACK_TARGET_BYTES + _SLACK)
        self.raw_bytes = 0
        self._segments = array.array("Q")  # (offset, length) of each chunk in `raw`

    def add(self, digest: bytes, chunk: bytes | memoryview) -> None:
        start, end = self.raw_bytes, self.raw_bytes + len(chunk)
        if end > len(self.raw):
            self.raw.extend(bytes(end - len(self.raw)))
        memoryview(self.raw)[start:end] = chunk
        self._segments.append(start)
        self._segments.append(len(chunk))
        self.digests += digest
        self.raw_bytes = end

    def add_pages(self, digests: bytes, block: memoryview, at: npt.NDArray[np.int64]) -> None:
        """`add` the whole pages `at` of `block` (their digests in `digests`), in one copy."""
        start, end = self.raw_bytes, self.raw_bytes + len(at) * CHUNK_SIZE
        if end > len(self.raw):
            self.raw.extend(bytes(end - len(self.raw)))
        dest = np.frombuffer(self.raw, dtype=f"V{CHUNK_SIZE}", count=len(at), offset=start)
        pages = np.frombuffer(block, dtype=f"V{CHUNK_SIZE}", count=len(block) // CHUNK_SIZE)
        np.take(pages, at, out=dest, mode="clip")
        del dest  # an export of self.raw would stop it from growing
        segments = np.empty((len(at), 2), dtype="<u8")
        segments[:, 0] = start + np.arange(len(at), dtype=np.uint64) * CHUNK_SIZE
        segments[:, 1] = CHUNK_SIZE
        self._segments.frombytes(segments.tobytes())
        self.digests += np.frombuffer(digests, dtype=f"V{DIGEST_SIZE}")[at].tobytes()
        self.raw_bytes = end

    def room(self) -> int:
        """How many more whole pages fill the pack (at least one)."""
        pages = -(-(PACK_TARGET_BYTES - self.raw_bytes) // CHUNK_SIZE)
        return max(1, min(pages, MAX_PACK_CHUNKS - len(self)))

    def full(self) -> bool:
        return self.raw_bytes >= PACK_TARGET_BYTES or len(self) >= MAX_PACK_CHUNKS

    def __len__(self) -> int:
        return len(self._segments) // 2

    def compress(self, level: int) -> tuple[list[Piece], bytes]:
        """The pack's bytes, as pieces to be written in order (raw chunks, then zstd
        frames), and its encoded index. Raw chunks are views of this builder's buffer and
        frames of zstd's output: no copy of the pack is made (two writer threads each held
        one, 10 MB of a checkpoint's peak). The pieces are valid until `recycle`."""
        return self._pack(level)

    def recycle(self) -> None:
        """Hand the buffer to the next pack, once no piece of this one is in use."""
        self._spare.append(self.raw)  # list.append is atomic: packing runs in other threads
        self.raw = bytearray()

    def _pack(self, level: int) -> tuple[list[Piece], bytes]:
        segs = np.frombuffer(self._segments, dtype="<u8").reshape(-1, 2).astype(np.int64)
        starts, sizes = segs[:, 0], segs[:, 1]
        buf = np.frombuffer(self.raw, dtype=np.uint8)
        zc = zstandard.ZstdCompressor(level=level)
        # Only whole pages may be stored raw (a restore copies them as rows of CHUNK_SIZE).
        raw = sizes == CHUNK_SIZE
        if raw.any():
            raw[raw] = ~_sample_compresses(zc, buf, starts[raw])
        tried = np.flatnonzero(~raw)
        group_of, slots, firsts = _groups(starts[tried], sizes[tried])
        group_bytes = np.add.reduceat(sizes[tried], firsts) if len(tried) else firsts
        frames: Any = None  # a BufferWithSegmentsCollection: iterable, not typed so
        frame_lengths = np.zeros(0, dtype=np.int64)
        keep = np.zeros(0, dtype=bool)
        if len(tried):
            segments = np.empty((len(firsts), 2), dtype="<u8")
            segments[:, 0], segments[:, 1] = starts[tried[firsts]], group_bytes
            frames = zc.multi_compress_to_buffer(
                zstandard.BufferWithSegments(self.raw, segments.tobytes()), threads=1
            )
            frame_lengths = np.fromiter(map(len, frames), dtype=np.int64, count=len(firsts))
            # Pages zstd shrinks by less than a sixteenth are cheaper to keep raw (a restore
            # copies them instead of decoding them); a short chunk stays a frame.
            whole = sizes[tried[firsts]] == CHUNK_SIZE
            worse = (frame_lengths * 16 > group_bytes * 15) & whole
            raw[tried[worse[group_of]]] = True
            keep = ~worse
        raw_at = np.flatnonzero(raw)
        raw_bytes = len(raw_at) * CHUNK_SIZE
        in_frame = keep[group_of] if len(tried) else np.zeros(0, dtype=bool)
        kept = tried[in_frame]
        del buf
        pieces: list[Piece] = _runs(memoryview(self.raw), starts[raw_at])
        if len(keep):
            pieces.extend(itertools.compress(frames, keep.tolist()))
        offsets = np.empty(len(self), dtype=np.int64)
        lengths = sizes.copy()
        entry_slots = np.zeros(len(self), dtype=np.uint16)
        offsets[raw_at] = np.arange(len(raw_at), dtype=np.int64) * CHUNK_SIZE
        stored = frame_lengths[keep]
        frame_at = np.zeros(len(keep), dtype=np.int64)
        frame_at[keep] = raw_bytes + np.cumsum(stored) - stored
        groups = group_of[in_frame]
        offsets[kept] = frame_at[groups]
        lengths[kept] = frame_lengths[groups]
        entry_slots[kept] = slots[in_frame]
        return pieces, encode_index(bytes(self.digests), offsets, lengths, raw, entry_slots)


def _groups(
    starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Chunks to compress (in pack order, at byte `starts` of the buffer) in frames: each
    chunk's frame, its slot in it, and each frame's first chunk. A frame is a run of whole
    pages that lie back to back in the buffer, GROUP_PAGES at most; a short chunk is alone."""
    n = len(starts)
    whole = sizes == CHUNK_SIZE
    cut = np.ones(n, dtype=bool)
    cut[1:] = ~whole[1:] | ~whole[:-1] | (starts[1:] != starts[:-1] + CHUNK_SIZE)
    run_starts = np.flatnonzero(cut)
    in_run = np.arange(n) - run_starts[np.cumsum(cut) - 1]
    cut |= in_run % GROUP_PAGES == 0
    group_of = np.cumsum(cut) - 1
    firsts = np.flatnonzero(cut)
    return group_of, np.arange(n) - firsts[group_of], firsts


def _runs(raw: memoryview, starts: npt.NDArray[np.int64]) -> list[Piece]:
    """The whole pages at byte offsets `starts` of `raw`, in order, as views: one per run of
    pages that lie back to back in it."""
    if not len(starts):
        return []
    cut = np.flatnonzero(np.diff(starts) != CHUNK_SIZE) + 1
    firsts = np.concatenate(([0], cut)).tolist()
    ends = np.concatenate((cut, [len(starts)])).tolist()
    at = starts.tolist()
    return [raw[at[i] : at[i] + (j - i) * CHUNK_SIZE] for i, j in zip(firsts, ends, strict=True)]


def _sample_compresses(
    zc: zstandard.ZstdCompressor, buf: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """Whether zstd shrinks a 256-byte sample of each page (at `starts` in `buf`) below 15/16:
    the pages whose samples do not are stored raw without compressing them whole."""
    pieces = np.lib.stride_tricks.as_strided(
        buf, shape=(len(buf) - _SAMPLE_PIECE + 1, _SAMPLE_PIECE), strides=(1, 1)
    )
    samples = pieces[(starts[:, None] + _PIECE_STARTS[None, :]).ravel()].tobytes()
    del pieces
    segments = np.empty((len(starts), 2), dtype="<u8")
    segments[:, 0] = np.arange(len(starts), dtype=np.uint64) * _SAMPLE_BYTES
    segments[:, 1] = _SAMPLE_BYTES
    out: Any = zc.multi_compress_to_buffer(
        zstandard.BufferWithSegments(samples, segments.tobytes()), threads=1
    )
    lengths = np.fromiter(map(len, out), dtype=np.int64, count=len(starts))
    return lengths < _SAMPLE_KEEP
