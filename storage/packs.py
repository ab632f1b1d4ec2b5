"""Packs: many small compressed chunks in one blob, with a separate index blob.

Memory images change page by page, scattered (DESIGN.md: 1% of Redis keys rewritten touches
8.4% of 4 KiB pages), so chunks are small. Storing each as its own object would cost tens of
thousands of objects per checkpoint; packs keep it to a handful. The index is written after
its pack, so an index always names a complete pack; a pack without an index is garbage.
"""

from __future__ import annotations

import secrets
import struct
import time
from dataclasses import dataclass

import zstandard

from storage.errors import CorruptCheckpoint
from storage.manifest import DIGEST_SIZE

PACK_TARGET_BYTES = 16 * 1024 * 1024
_IDX_MAGIC = b"CKPTIDX1"
_IDX_ENTRY = struct.Struct(f"<{DIGEST_SIZE}sII")  # digest, offset, compressed length


def new_pack_id() -> str:
    """Creation time (hex seconds) then randomness: garbage collection reads a pack's age
    from its name, which works the same on every backend."""
    return f"{int(time.time()):08x}{secrets.token_hex(12)}"


def pack_created(pack_id: str) -> float:
    try:
        return float(int(pack_id[:8], 16))
    except ValueError:
        return 0.0


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[-2:]}/{pack_id}.pack"


def index_key(pack_id: str) -> str:
    return f"packs/{pack_id[-2:]}/{pack_id}.idx"


def pack_id_of_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    for suffix in (".pack", ".idx"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def pack_id_of_index_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    return name[: -len(".idx")] if name.endswith(".idx") else None


@dataclass(frozen=True)
class PackEntry:
    offset: int
    length: int


def encode_index(entries: dict[bytes, PackEntry]) -> bytes:
    out = bytearray(_IDX_MAGIC)
    out += struct.pack("<I", len(entries))
    for digest, e in entries.items():
        out += _IDX_ENTRY.pack(digest, e.offset, e.length)
    return bytes(out)


def decode_index(raw: bytes, where: str) -> dict[bytes, PackEntry]:
    if raw[: len(_IDX_MAGIC)] != _IDX_MAGIC or len(raw) < len(_IDX_MAGIC) + 4:
        raise CorruptCheckpoint(f"pack index {where} is damaged (bad header)")
    (count,) = struct.unpack_from("<I", raw, len(_IDX_MAGIC))
    start = len(_IDX_MAGIC) + 4
    if len(raw) != start + count * _IDX_ENTRY.size:
        raise CorruptCheckpoint(f"pack index {where} is damaged (truncated)")
    entries: dict[bytes, PackEntry] = {}
    for digest, offset, length in _IDX_ENTRY.iter_unpack(raw[start:]):
        entries[digest] = PackEntry(offset, length)
    return entries


class PackBuilder:
    """Collects new chunks until the pack is big enough, then compresses them all at once.

    Compressing a whole pack in one call (zstd's multi_compress_to_buffer) runs on every core
    without the GIL, so the next pack's chunks are hashed meanwhile.
    """

    def __init__(self) -> None:
        self.pack_id = new_pack_id()
        self.digests: list[bytes] = []
        self.chunks: list[bytes | bytearray | memoryview] = []
        self.raw_bytes = 0

    def add(self, digest: bytes, chunk: bytes) -> None:
        self.digests.append(digest)
        self.chunks.append(chunk)
        self.raw_bytes += len(chunk)

    def full(self) -> bool:
        return self.raw_bytes >= PACK_TARGET_BYTES

    def __len__(self) -> int:
        return len(self.digests)

    def seal(self, level: int) -> tuple[bytes, dict[bytes, PackEntry]]:
        """The pack's bytes (zstd frames, one per chunk) and its index."""
        frames = zstandard.ZstdCompressor(level=level).multi_compress_to_buffer(
            self.chunks, threads=-1
        )
        data = bytearray()
        entries: dict[bytes, PackEntry] = {}
        for i, digest in enumerate(self.digests):
            frame = frames[i].tobytes()
            entries[digest] = PackEntry(len(data), len(frame))
            data += frame
        self.chunks = []
        return bytes(data), entries
