"""Packs: many small compressed chunks in one blob, with a separate index blob.

Memory images change page by page, scattered (DESIGN.md: 1% of Redis keys rewritten touches
8.4% of 4 KiB pages), so chunks are small. Storing each as its own object would cost tens of
thousands of objects per checkpoint; packs keep it to a handful. The index is written after
its pack, so an index always names a complete pack; a pack without an index is garbage.
"""

from __future__ import annotations

import array
import itertools
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from storage.errors import CorruptCheckpoint
from storage.manifest import DIGEST_SIZE

# Three pack buffers live at once (one filling, two compressing and storing), so the pack size
# sets most of a checkpoint's memory. Measured on 1 GB of Redis pages in the daemon: 8 MiB packs
# were 7% faster than 4 MiB but peaked 17 MB higher.
PACK_TARGET_BYTES = 4 * 1024 * 1024
_SLACK = 64 * 1024  # room past the target for the chunk that fills a pack
# Many tiny chunks (small image files) would make an index big: a pack closes at this many.
MAX_PACK_CHUNKS = 1 << 16
_IDX_MAGIC = b"CKPTIDX1"
_IDX_ENTRY = struct.Struct(f"<{DIGEST_SIZE}sII")  # digest, offset, compressed length
# What a reader accepts before reading a blob whole (a bucket writer picks sizes). Packs of the
# first releases were 16 MiB; incompressible frames are a little larger than their chunks.
MAX_PACK_BYTES = 64 * 1024 * 1024
MAX_INDEX_BYTES = 1024 + MAX_PACK_CHUNKS * _IDX_ENTRY.size + 1024


def new_pack_id() -> str:
    """Creation time (hex seconds) then randomness: garbage collection reads a pack's age
    from its name, which works the same on every backend."""
    return f"{int(time.time()):08x}{secrets.token_hex(12)}"


def pack_created(pack_id: str) -> float:
    try:
        return float(int(pack_id[:8], 16))
    except ValueError:
        return 0.0


def encode_index(digests: bytes, offsets: Sequence[int], lengths: Sequence[int]) -> bytes:
    """The index of a pack: each chunk's digest with where its frame lies in the pack."""
    out = bytearray(_IDX_MAGIC)
    out += struct.pack("<I", len(offsets))
    for i, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        out += _IDX_ENTRY.pack(digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE], offset, length)
    return bytes(out)


def _index_body(raw: bytes, where: str) -> memoryview:
    if raw[: len(_IDX_MAGIC)] != _IDX_MAGIC or len(raw) < len(_IDX_MAGIC) + 4:
        raise CorruptCheckpoint(f"pack index {where} is damaged (bad header)")
    (count,) = struct.unpack_from("<I", raw, len(_IDX_MAGIC))
    start = len(_IDX_MAGIC) + 4
    if len(raw) != start + count * _IDX_ENTRY.size:
        raise CorruptCheckpoint(f"pack index {where} is damaged (truncated)")
    return memoryview(raw)[start:]


@dataclass(frozen=True)
class IndexArrays:
    """A pack index as arrays: digests concatenated, frame offsets and lengths."""

    digests: bytes
    offsets: npt.NDArray[np.uint32]
    lengths: npt.NDArray[np.uint32]


def decode_index_arrays(raw: bytes, where: str) -> IndexArrays:
    """The index without a Python object per chunk (restores and index loads use this)."""
    body = np.frombuffer(_index_body(raw, where), dtype=np.uint8).reshape(-1, _IDX_ENTRY.size)
    fields = body[:, DIGEST_SIZE:].copy().view("<u4")
    return IndexArrays(
        body[:, :DIGEST_SIZE].tobytes(), fields[:, 0].astype(np.uint32), fields[:, 1].copy()
    )


class PackBuilder:
    """Collects new chunks until the pack is big enough, then compresses them all at once.

    Chunks are copied into one buffer (no object per chunk) and compressed in one call (zstd's
    multi_compress_to_buffer, a frame per chunk) that runs without the GIL in a writer thread,
    so the next pack's chunks are hashed meanwhile. One thread per pack, two packs in flight:
    measured faster on two cores than zstd's own threads, which fight the hashing thread.
    """

    def __init__(self, spare: list[bytearray] | None = None) -> None:
        self.pack_id = new_pack_id()
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

    def full(self) -> bool:
        return self.raw_bytes >= PACK_TARGET_BYTES or len(self) >= MAX_PACK_CHUNKS

    def __len__(self) -> int:
        return len(self._segments) // 2

    def compress(self, level: int) -> tuple[bytes, bytes]:
        """The pack's bytes (zstd frames, one per chunk) and its encoded index."""
        frames = zstandard.ZstdCompressor(level=level).multi_compress_to_buffer(
            zstandard.BufferWithSegments(self.raw, self._segments.tobytes()), threads=1
        )
        self._spare.append(self.raw)  # list.append is atomic: compressing runs in other threads
        self.raw = bytearray()
        lengths = [len(frames[i]) for i in range(len(frames))]
        offsets = list(itertools.accumulate(lengths, initial=0))[:-1]
        data = b"".join(frames[i] for i in range(len(frames)))  # type: ignore[misc]
        return data, encode_index(bytes(self.digests), offsets, lengths)
