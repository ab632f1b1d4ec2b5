"""The repository: folders in, folders out, deduplicated by content.

Write path (commit): every file is cut into fixed CHUNK_SIZE chunks (4 KiB: memory images are
raw pages, so page-sized chunks dedup scattered page changes, and a page inserted in the middle
shifts the rest by whole chunks), each hashed with BLAKE3; chunks the repository already holds
are only referenced, new ones are zstd-compressed into packs. Packs and their indexes are
written first, the manifest last: a checkpoint without a manifest does not exist.

Read path (materialize): the manifest's packs are fetched one at a time, each chunk is
decompressed, re-hashed and written where it belongs. Memory is bounded by one pack plus the
chunk map, whatever the image size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import zstandard

from storage.backends.base import BlobStore
from storage.errors import BlobExists, BlobNotFound, CheckpointNotFound, CorruptCheckpoint
from storage.manifest import (
    FileEntry,
    Manifest,
    check_workload_name,
    is_checkpoint_id,
    new_checkpoint_id,
)
from storage.packs import (
    PackBuilder,
    PackEntry,
    decode_index,
    encode_index,
    index_key,
    pack_id_of_index_key,
    pack_key,
)

CHUNK_SIZE = 4096
_READ_BLOCK = 1024 * 1024
_ZSTD_LEVEL = 1


def manifest_key(workload: str, checkpoint_id: str) -> str:
    return f"manifests/{workload}/{checkpoint_id}.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """What `list` shows of a checkpoint without reading its chunks."""

    id: str
    workload: str
    created: datetime
    size_bytes: int
    new_bytes: int
    metadata: dict[str, Any]


class Repository:
    """Checkpoints of workloads over any BlobStore. Safe to use from several threads."""

    def __init__(self, backend: BlobStore) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._known: dict[bytes, str] | None = None  # digest -> pack id, only durable packs

    # -- write -------------------------------------------------------------------------

    def commit(
        self, workload: str, folder: Path, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        """Store the files under `folder` as a new checkpoint of `workload`; return its manifest."""
        check_workload_name(workload)
        known = self._known_chunks()
        cid = new_checkpoint_id()
        compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        builder = PackBuilder()
        pending: dict[bytes, str] = {}  # chunks of this checkpoint in packs not yet indexed here
        used_packs: set[str] = set()
        files: list[FileEntry] = []
        size_bytes = new_bytes = new_chunks = total_chunks = 0

        def flush() -> None:
            nonlocal builder, new_bytes
            if not len(builder):
                return
            self.backend.put(pack_key(builder.pack_id), bytes(builder.data))
            self.backend.put(index_key(builder.pack_id), encode_index(builder.entries))
            new_bytes += len(builder.data)
            with self._lock:
                for digest in builder.entries:
                    known[digest] = builder.pack_id
            builder = PackBuilder()

        for rel, path in _walk_files(folder):
            st = path.stat()
            digests = bytearray()
            with open(path, "rb") as f:
                while block := f.read(_READ_BLOCK):
                    for off in range(0, len(block), CHUNK_SIZE):
                        chunk = block[off : off + CHUNK_SIZE]
                        digest = blake3.blake3(chunk).digest()
                        digests += digest
                        total_chunks += 1
                        pack_id = known.get(digest) or pending.get(digest)
                        if pack_id is None:
                            pack_id = builder.pack_id
                            builder.add(digest, compressor.compress(chunk), len(chunk))
                            pending[digest] = pack_id
                            new_chunks += 1
                        used_packs.add(pack_id)
                        if builder.full():
                            flush()
            size_bytes += st.st_size
            files.append(FileEntry(rel, st.st_size, st.st_mode & 0o777, bytes(digests)))
        flush()

        manifest = Manifest(
            id=cid,
            workload=workload,
            created=datetime.now(UTC),
            chunk_size=CHUNK_SIZE,
            files=files,
            packs=sorted(used_packs),
            metadata=dict(metadata or {}),
            size_bytes=size_bytes,
            new_bytes=new_bytes,
            new_chunks=new_chunks,
            total_chunks=total_chunks,
        )
        self.backend.put(manifest_key(workload, cid), manifest.to_json())
        return manifest

    def _known_chunks(self) -> dict[bytes, str]:
        """The digests of every durable pack, read once from the pack indexes."""
        with self._lock:
            if self._known is None:
                known: dict[bytes, str] = {}
                for key in self.backend.list("packs/"):
                    pack_id = pack_id_of_index_key(key)
                    if pack_id is None:
                        continue
                    for digest in decode_index(self.backend.get(key), key):
                        known[digest] = pack_id
                self._known = known
            return self._known

    # -- read --------------------------------------------------------------------------

    def checkpoints(self, workload: str) -> list[CheckpointInfo]:
        """Committed checkpoints of `workload`, newest first."""
        check_workload_name(workload)
        infos = []
        for key in self.backend.list(f"manifests/{workload}/"):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not is_checkpoint_id(name[:-5]):
                continue
            try:
                m = self.read_manifest(workload, name[:-5])
            except (CorruptCheckpoint, CheckpointNotFound):
                continue  # listed but unreadable: `verify` reports it; don't hide the others
            infos.append(
                CheckpointInfo(m.id, workload, m.created, m.size_bytes, m.new_bytes, m.metadata)
            )
        infos.sort(key=lambda i: i.id, reverse=True)
        return infos

    def workloads(self) -> list[str]:
        keys = self.backend.list("manifests/")
        names = {key.split("/")[1] for key in keys if key.count("/") == 2}
        return sorted(names)

    def read_manifest(self, workload: str, checkpoint_id: str) -> Manifest:
        check_workload_name(workload)
        if not is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFound(
                f"{checkpoint_id!r} is not a checkpoint id; "
                f"see `checkpointer list {workload}` for the ids"
            )
        key = manifest_key(workload, checkpoint_id)
        try:
            raw = self.backend.get(key)
        except BlobNotFound as e:
            raise CheckpointNotFound(
                f"workload {workload} has no checkpoint {checkpoint_id}; "
                f"see `checkpointer list {workload}`"
            ) from e
        manifest = Manifest.from_json(raw, f"checkpoint {checkpoint_id} of {workload}")
        if manifest.id != checkpoint_id or manifest.workload != workload:
            raise CorruptCheckpoint(
                f"checkpoint {checkpoint_id} of {workload}: manifest names "
                f"{manifest.workload}/{manifest.id}"
            )
        return manifest

    def materialize(self, workload: str, checkpoint_id: str, dest: Path) -> Manifest:
        """Rebuild the checkpointed folder in `dest` (created 0700), verifying every chunk.

        Raises CorruptCheckpoint naming the checkpoint if any chunk is missing or damaged.
        """
        manifest = self.read_manifest(workload, checkpoint_id)
        where = f"checkpoint {checkpoint_id} of {workload}"
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(dest, 0o700)
        # digest -> [(file index, offset)]: each pack is then fetched exactly once.
        wanted: dict[bytes, list[tuple[int, int]]] = {}
        fds: list[int] = []
        try:
            for i, entry in enumerate(manifest.files):
                target = dest / entry.name
                if target.resolve().parent != dest.resolve() / Path(entry.name).parent:
                    raise CorruptCheckpoint(f"{where}: unsafe file name {entry.name!r}")
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                fds.append(fd)
                os.ftruncate(fd, entry.size)
                for n, digest in enumerate(entry.chunk_digests()):
                    wanted.setdefault(digest, []).append((i, n * manifest.chunk_size))
            decompressor = zstandard.ZstdDecompressor()
            for pack_id in manifest.packs:
                index = self._read_index(pack_id, where)
                needed = [(d, e) for d, e in index.items() if d in wanted]
                if not needed:
                    continue
                data = self._read_pack(pack_id, where)
                for digest, e in needed:
                    chunk = _unpack_chunk(decompressor, data, e, where, pack_id)
                    if blake3.blake3(chunk).digest() != digest:
                        raise CorruptCheckpoint(
                            f"{where} is corrupt: chunk {digest.hex()[:16]} in pack {pack_id} "
                            "does not match its hash; restore an older checkpoint "
                            "(see `checkpointer list`)"
                        )
                    for file_index, offset in wanted.pop(digest):
                        os.pwrite(fds[file_index], chunk, offset)
            if wanted:
                missing = next(iter(wanted)).hex()[:16]
                raise CorruptCheckpoint(
                    f"{where} is incomplete: {len(wanted)} chunk(s) (first {missing}) are in "
                    "none of its packs; restore an older checkpoint"
                )
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        for entry in manifest.files:
            os.chmod(dest / entry.name, entry.mode & 0o700 or 0o600)
        return manifest

    def _read_index(self, pack_id: str, where: str) -> dict[bytes, PackEntry]:
        try:
            return decode_index(self.backend.get(index_key(pack_id)), index_key(pack_id))
        except BlobNotFound as e:
            raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where} is corrupt: {e}") from e

    def _read_pack(self, pack_id: str, where: str) -> bytes:
        try:
            return self.backend.get(pack_key(pack_id))
        except BlobNotFound as e:
            raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e

    # -- delete ------------------------------------------------------------------------

    def delete(self, workload: str, checkpoint_id: str) -> None:
        """Forget a checkpoint. Its chunks stay until garbage collection finds them unused."""
        self.read_manifest(workload, checkpoint_id)  # a clear error for an unknown id
        self.backend.delete(manifest_key(workload, checkpoint_id))

    def verify(self, workload: str, checkpoint_id: str) -> Manifest:
        """Re-hash every chunk of a checkpoint by materialising it into a scratch folder."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="checkpointer-verify-") as tmp:
            return self.materialize(workload, checkpoint_id, Path(tmp))


def _unpack_chunk(
    decompressor: zstandard.ZstdDecompressor, data: bytes, e: PackEntry, where: str, pack_id: str
) -> bytes:
    frame = data[e.offset : e.offset + e.length]
    try:
        return decompressor.decompress(frame)
    except zstandard.ZstdError as err:
        raise CorruptCheckpoint(
            f"{where} is corrupt: a chunk in pack {pack_id} does not decompress ({err}); "
            "restore an older checkpoint (see `checkpointer list`)"
        ) from err


def _walk_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """Regular files under `folder`, sorted, as (relative name, path)."""
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            yield str(path.relative_to(folder)), path


__all__ = ["CHUNK_SIZE", "BlobExists", "CheckpointInfo", "Repository"]
