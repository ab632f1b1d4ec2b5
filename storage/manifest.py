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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.errors import CorruptCheckpoint

FORMAT_VERSION = 1
_SPLICE = "\u0000chunks\u0000"  # placeholder for a file's chunk list while the JSON is built
DIGEST_SIZE = 32
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$")


def check_workload_name(name: str) -> str:
    """Workload names become key prefixes and file names: keep them to a safe alphabet."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid workload name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def is_checkpoint_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


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

    def to_json(self) -> bytes:
        """The manifest as JSON. The chunk lists (base64, 43 bytes per 4 KiB chunk: ~11 MB for
        a 1 GB image) are spliced in as bytes rather than built into one big str and encoded,
        which would hold three copies at once."""
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
        out = [parts[0]]
        for f, rest in zip(self.files, parts[1:], strict=True):
            out += [b'"', base64.b64encode(f.digests), b'"', rest]
        return b"".join(out)

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("version") != FORMAT_VERSION:
                raise CorruptCheckpoint(
                    f"{where}: manifest format {doc.get('version')!r} is not supported by this "
                    f"version of checkpointer (it reads {FORMAT_VERSION}); upgrade checkpointer"
                )
            files = [
                FileEntry(
                    name=f["name"],
                    size=int(f["size"]),
                    mode=int(f["mode"]),
                    digests=base64.b64decode(f["chunks"], validate=True),
                )
                for f in doc["files"]
            ]
            return cls(
                id=doc["id"],
                workload=doc["workload"],
                created=datetime.fromisoformat(doc["created"]),
                chunk_size=int(doc["chunk_size"]),
                files=files,
                packs=list(doc["packs"]),
                metadata=dict(doc.get("metadata") or {}),
                size_bytes=int(doc.get("size_bytes", 0)),
                new_bytes=int(doc.get("new_bytes", 0)),
                new_chunks=int(doc.get("new_chunks", 0)),
                total_chunks=int(doc.get("total_chunks", 0)),
            )
        except CorruptCheckpoint:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(f"{where}: manifest is unreadable ({e})") from e
