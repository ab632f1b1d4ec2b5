"""The manifest: one JSON object per checkpoint, written last, the commit point.

A manifest lists every file of the checkpointed folder as the ordered digests of its chunks,
the packs that hold those chunks, and free-form metadata from the caller. It is small enough
to read whole: 32 bytes of digest per 4 KiB chunk (0.8% of the image).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.errors import CorruptCheckpoint

FORMAT_VERSION = 1
_SPLICE = "\u0000chunks\u0000"  # placeholder for a file's chunk list while the JSON is built
_B64_STEP = 3 * 256 * 1024  # digests base64-encoded at a time (a multiple of 3: no padding)
DIGEST_SIZE = 32
CHUNK_SIZE = 4096
# Limits on what a manifest read back may declare (it is input from whoever can write the
# bucket): 256 MiB of manifest is ~24 GB of image; a CRIU image folder holds tens of files.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_FILES = 100_000
MAX_PACKS = 1_000_000
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ID_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}")
_FILE_RE = re.compile(r"[A-Za-z0-9_.:+=@,-]{1,255}")
_PACK_RE = re.compile(r"[0-9a-f]{32}")


def check_workload_name(name: str) -> str:
    """Workload names become key prefixes and file names: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid workload name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def is_checkpoint_id(text: str) -> bool:
    return isinstance(text, str) and bool(_ID_RE.fullmatch(text))


def new_checkpoint_id(now: datetime | None = None) -> str:
    """Ids sort by creation time (UTC, microseconds), with a random suffix against ties."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


@dataclass
class FileEntry:
    name: str
    size: int
    mode: int
    digests: bytes | bytearray  # concatenated DIGEST_SIZE-byte digests, in file order


@dataclass
class Manifest:
    id: str
    workload: str
    created: datetime
    chunk_size: int
    files: list[FileEntry]
    packs: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0  # bytes of the folder as checkpointed
    new_bytes: int = 0  # compressed bytes this checkpoint newly wrote to the backend
    new_chunks: int = 0
    total_chunks: int = 0

    def to_json(self) -> bytearray:
        """The manifest as JSON, in one buffer (see `json_pieces`)."""
        out = bytearray()
        for piece in self.json_pieces():
            out += piece
        return out

    def json_pieces(self) -> Iterator[bytes]:
        """The manifest's JSON, in pieces, in order.

        The chunk lists (base64, 43 bytes per 4 KiB chunk: 43 MB for a 4 GB image) are
        encoded a slice at a time as the pieces are consumed, so a commit seals and writes
        the manifest (Codec.seal_stream, BlobStore.put_pieces) without its JSON ever being
        whole in memory."""
        doc = {
            "version": FORMAT_VERSION,
            "id": self.id,
            "workload": self.workload,
            "created": self.created.isoformat(),
            "hash": "blake3",
            "compression": "zstd",
            "chunk_size": self.chunk_size,
            "size_bytes": self.size_bytes,
            "new_bytes": self.new_bytes,
            "new_chunks": self.new_chunks,
            "total_chunks": self.total_chunks,
            "packs": self.packs,
            "metadata": self.metadata,
            "files": [
                {"name": f.name, "size": f.size, "mode": f.mode, "chunks": _SPLICE}
                for f in self.files
            ],
        }
        parts = json.dumps(doc, indent=1).encode().split(json.dumps(_SPLICE).encode())
        if len(parts) != len(self.files) + 1:  # the marker also appeared elsewhere
            raise ValueError("manifest metadata contains the chunk-list marker")
        return self._pieces(parts)

    def _pieces(self, parts: list[bytes]) -> Iterator[bytes]:
        yield parts[0]
        for f, rest in zip(self.files, parts[1:], strict=True):
            yield b'"'
            view = memoryview(f.digests)
            for start in range(0, len(view), _B64_STEP):
                yield base64.b64encode(view[start : start + _B64_STEP])
            yield b'"' + rest

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("version") != FORMAT_VERSION:
                raise CorruptCheckpoint(
                    f"{where}: manifest format {doc.get('version')!r} is not supported by this "
                    f"version of checkpointer (it reads {FORMAT_VERSION}); upgrade checkpointer"
                )
            chunk_size = int(doc["chunk_size"])
            if chunk_size != CHUNK_SIZE:
                raise ValueError(f"chunk size {chunk_size} (this version writes {CHUNK_SIZE})")
            if not isinstance(doc["files"], list) or len(doc["files"]) > MAX_FILES:
                raise ValueError(f"files is not a list of at most {MAX_FILES}")
            files = [_file_entry(f, chunk_size) for f in doc["files"]]
            if len({f.name for f in files}) != len(files):
                raise ValueError("a file is listed twice")
            packs = doc["packs"]
            if not isinstance(packs, list) or len(packs) > MAX_PACKS:
                raise ValueError(f"packs is not a list of at most {MAX_PACKS}")
            if not all(isinstance(p, str) and _PACK_RE.fullmatch(p) for p in packs):
                raise ValueError("packs holds something that is not a pack id")
            if not (check_workload_name(doc["workload"]) and is_checkpoint_id(doc["id"])):
                raise ValueError("bad checkpoint id")
            return cls(
                id=doc["id"],
                workload=doc["workload"],
                created=datetime.fromisoformat(doc["created"]),
                chunk_size=chunk_size,
                files=files,
                packs=packs,
                metadata=dict(doc.get("metadata") or {}),
                size_bytes=int(doc.get("size_bytes", 0)),
                new_bytes=int(doc.get("new_bytes", 0)),
                new_chunks=int(doc.get("new_chunks", 0)),
                total_chunks=int(doc.get("total_chunks", 0)),
            )
        except CorruptCheckpoint:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise CorruptCheckpoint(f"{where}: manifest is unreadable ({e})") from e


def _file_entry(f: Any, chunk_size: int) -> FileEntry:
    """One file of a manifest, checked: a flat name inside the image folder (never a path),
    a chunk list of whole digests, and a size those chunks can hold."""
    name = f["name"]
    if not isinstance(name, str) or not _FILE_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"unsafe file name {name!r}: only flat names inside the image folder")
    size, mode = f["size"], f["mode"]
    if type(size) is not int or type(mode) is not int or not 0 <= mode <= 0o7777:
        raise ValueError(f"{name}: size and mode must be integers")
    digests = base64.b64decode(f["chunks"], validate=True)
    count, rest = divmod(len(digests), DIGEST_SIZE)
    fits = (count - 1) * chunk_size < size <= count * chunk_size if count else size == 0
    if rest or not fits:
        raise ValueError(f"{name}: {count} chunks cannot hold {size} bytes")
    return FileEntry(name=name, size=size, mode=mode, digests=digests)
