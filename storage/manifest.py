"""The manifest: one object per checkpoint, written last, the commit point.

A manifest lists every file of the checkpointed folder as the ordered digests of its chunks,
the packs that hold those chunks, and free-form metadata from the caller. It is small enough
to read whole: 32 bytes of digest per 4 KiB chunk (0.8% of the image).

Format 2 (written since 2026-12): `CKPTMAN2`, a u32 (little-endian) length, a JSON header of
that length (everything but the digests; each file says how many chunks it has), then the
digests of every file, raw, in file order; nothing after. Format 1 was one JSON document with
each chunk list in base64: 35% bigger, and decoding it was most of reading a manifest (a lazy
restore starts with that). Both are read; an older checkpointer cannot read format 2 (upgrade
every host of a fleet sharing a bucket before the first checkpoint with the new one).

Format 3 (written since issue 27) is format 2 whose header says `"pack_layout": "workload"`:
its packs are stored under its workload's prefix (storage/keys.py), not in the legacy flat
layout. The field decides where a reader looks for the packs, in whatever format it comes (a
sealed manifest is authenticated: a listing of the bucket never decides it); the version
number only makes an older checkpointer refuse the manifest in one clear line instead of
looking for its packs where they are not.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.errors import CorruptCheckpoint

FORMAT_VERSION = 3  # what this version writes
BINARY_VERSIONS = (2, FORMAT_VERSION)  # read behind the binary magic
JSON_FORMAT_VERSION = 1  # the all-JSON format of earlier versions, still read
WORKLOAD_LAYOUT = "workload"  # `pack_layout`: packs under the workload's prefix
_BINARY_MAGIC = b"CKPTMAN2"
_HEADER_LEN = struct.Struct("<I")
_DIGEST_PIECE = 1024 * 1024  # digests handed to the sealing a MiB at a time
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
    scoped_packs: bool = False  # packs under the workload's prefix; False: legacy flat layout

    @property
    def pack_home(self) -> str | None:
        """Where its packs live: the workload whose prefix holds them, or None for the legacy
        flat layout (storage/keys.py, `pack_key`)."""
        return self.workload if self.scoped_packs else None

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The manifest in format 3 (2 for flat packs), in pieces: a commit seals and writes
        it as they come (Codec.seal_stream, BlobStore.put_pieces), so it is never whole in
        memory."""
        # A manifest of flat packs comes out as format 2 did: what earlier versions wrote.
        doc = self._doc(FORMAT_VERSION if self.scoped_packs else BINARY_VERSIONS[0])
        doc["files"] = [
            {
                "name": f.name,
                "size": f.size,
                "mode": f.mode,
                "chunks": len(f.digests) // DIGEST_SIZE,
            }
            for f in self.files
        ]
        header = json.dumps(doc, separators=(",", ":")).encode()
        yield _BINARY_MAGIC + _HEADER_LEN.pack(len(header)) + header
        for f in self.files:
            view = memoryview(f.digests)
            for start in range(0, len(view), _DIGEST_PIECE):
                yield view[start : start + _DIGEST_PIECE]

    def _doc(self, version: int) -> dict[str, Any]:
        layout = {"pack_layout": WORKLOAD_LAYOUT} if self.scoped_packs else {}
        return {
            **layout,
            "version": version,
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
        }

    def to_json(self) -> bytearray:
        """The manifest in format 1 (JSON), in one buffer: what earlier versions wrote (the
        tests write it to check that it is still read)."""
        out = bytearray()
        for piece in self.json_pieces():
            out += piece
        return out

    def json_pieces(self) -> Iterator[bytes]:
        """Format 1's JSON in pieces, each chunk list base64-encoded a slice at a time."""
        doc = self._doc(JSON_FORMAT_VERSION)
        doc["files"] = [
            {"name": f.name, "size": f.size, "mode": f.mode, "chunks": _SPLICE} for f in self.files
        ]
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
    def parse(cls, raw: bytes, where: str) -> Manifest:
        """A manifest read back (format 2, or 1), checked: it is input from whoever can
        write the bucket. CorruptCheckpoint, naming `where`, if it is not a valid one."""
        try:
            if raw[: len(_BINARY_MAGIC)] == _BINARY_MAGIC:
                return cls._from_doc(*_binary(raw), BINARY_VERSIONS, where)
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            files = doc.get("files")
            if not isinstance(files, list) or len(files) > MAX_FILES:
                raise ValueError(f"files is not a list of at most {MAX_FILES}")
            digests = [_base64_digests(f) for f in files]
            return cls._from_doc(doc, digests, (JSON_FORMAT_VERSION,), where)
        except CorruptCheckpoint:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise CorruptCheckpoint(f"{where}: manifest is unreadable ({e})") from e

    @classmethod
    def _from_doc(
        cls, doc: dict[str, Any], digests: list[bytes], versions: tuple[int, ...], where: str
    ) -> Manifest:
        if doc.get("version") not in versions:
            raise CorruptCheckpoint(
                f"{where}: manifest format {doc.get('version')!r} is not supported by this "
                f"version of checkpointer (it reads {JSON_FORMAT_VERSION} to "
                f"{FORMAT_VERSION}); upgrade checkpointer"
            )
        layout = doc.get("pack_layout")
        if layout not in (None, WORKLOAD_LAYOUT):
            raise CorruptCheckpoint(
                f"{where}: pack layout {layout!r} is not one this version of checkpointer "
                "knows; upgrade checkpointer"
            )
        chunk_size = int(doc["chunk_size"])
        if chunk_size != CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size} (this version writes {CHUNK_SIZE})")
        if not isinstance(doc["files"], list) or len(doc["files"]) > MAX_FILES:
            raise ValueError(f"files is not a list of at most {MAX_FILES}")
        files = [_file_entry(f, d, chunk_size) for f, d in zip(doc["files"], digests, strict=True)]
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
            scoped_packs=layout == WORKLOAD_LAYOUT,
        )


def _count(f: FileEntry) -> int:
    return len(f.digests) // DIGEST_SIZE


def _binary(raw: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Format 2's header and each file's digests; ValueError unless the lengths it declares
    add up to exactly the bytes there are."""
    start = len(_BINARY_MAGIC) + _HEADER_LEN.size
    if len(raw) < start:
        raise ValueError("cut short")
    (header_len,) = _HEADER_LEN.unpack_from(raw, len(_BINARY_MAGIC))
    if start + header_len > len(raw):
        raise ValueError("its header runs past its end")
    doc = json.loads(raw[start : start + header_len])
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise ValueError("its header is not an object with a list of files")
    if len(doc["files"]) > MAX_FILES:
        raise ValueError(f"files is not a list of at most {MAX_FILES}")
    digests, at = [], start + header_len
    for f in doc["files"]:
        count = f["chunks"] if isinstance(f, dict) else None
        if type(count) is not int or count < 0:
            raise ValueError("a file's chunk count is not a non-negative integer")
        end = at + count * DIGEST_SIZE
        if end > len(raw):
            raise ValueError("its files have more chunks than it holds digests")
        digests.append(raw[at:end])
        at = end
    if at != len(raw):
        raise ValueError(f"{len(raw) - at} bytes after the digests of its files")
    return doc, digests


def _base64_digests(f: Any) -> bytes:
    chunks = f["chunks"]
    if not isinstance(chunks, str):
        raise ValueError("a file's chunks is not a string")
    # Strict: only the alphabet, padded right, nothing after (b64decode's validate=True
    # checks the alphabet with a regular expression first: a fifth of reading a manifest).
    return binascii.a2b_base64(chunks, strict_mode=True)


def _file_entry(f: Any, digests: bytes, chunk_size: int) -> FileEntry:
    """One file of a manifest, checked: a flat name inside the image folder (never a path),
    a chunk list of whole digests, and a size those chunks can hold."""
    name = f["name"]
    if not isinstance(name, str) or not _FILE_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"unsafe file name {name!r}: only flat names inside the image folder")
    size, mode = f["size"], f["mode"]
    if type(size) is not int or type(mode) is not int or not 0 <= mode <= 0o7777:
        raise ValueError(f"{name}: size and mode must be integers")
    count, rest = divmod(len(digests), DIGEST_SIZE)
    fits = (count - 1) * chunk_size < size <= count * chunk_size if count else size == 0
    if rest or not fits:
        raise ValueError(f"{name}: {count} chunks cannot hold {size} bytes")
    return FileEntry(name=name, size=size, mode=mode, digests=digests)
