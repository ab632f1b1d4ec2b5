"""The repository: folders in, folders out, deduplicated by content.

Write path (commit): every file is cut into fixed CHUNK_SIZE chunks (4 KiB: memory images are
raw pages, so page-sized chunks dedup scattered page changes, and a page inserted in the middle
shifts the rest by whole chunks), each hashed with BLAKE3; chunks the repository already holds
(the ChunkIndex, looked up a 1 MiB block at a time) are only referenced, new ones are copied
into packs that writer threads compress (or keep raw, when zstd would not shrink them: see
storage/packs.py) and store while the next pack fills. Packs and their indexes are written
first, the manifest last: a checkpoint without a manifest does not exist.

Read path (materialize, storage/rebuild.py): the manifest's packs are fetched a few at a time;
the chunks of a pack the checkpoint needs are found with one vectorised search, and each pack is
opened, decoded and written by one reader thread, one per core. Memory is a few pack-sized
buffers per thread plus 44 bytes a chunk, with no Python object per chunk.

Encryption (storage/crypto.py) is the codec's business: chunk ids are keyed hashes, and every
object is sealed under its own name. A sealed pack's tag verifies all its frames in one call,
so an encrypted repository skips the per-chunk re-hash of restores. Everything read back is
hostile input until it opens: sizes are capped before reading (the limits below), manifests
are validated (storage/manifest.py), files are created only by flat name inside the image folder.

Garbage collection and spool shedding live in storage/gc.py.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from storage import keys, pack_reading, pins
from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.crypto import Codec, Plain
from storage.dedup_index import DedupIndex, ReusedPacksGone
from storage.errors import (
    BlobExists,
    BlobNotFound,
    CheckpointNotFound,
    CorruptCheckpoint,
    StorageError,
)
from storage.fencing import Fencing
from storage.heads import Heads
from storage.image_folder import image_files, read_full
from storage.keys import FileType, index_key, manifest_key, pack_key
from storage.manifest import (
    CHUNK_SIZE,
    DIGEST_SIZE,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    check_workload_name,
    is_checkpoint_id,
    new_checkpoint_id,
)
from storage.pack_writer import PackWriter
from storage.packs import (
    IndexArrays,
)
from storage.rebuild import materialize
from storage.rwlock import RWLock

log = logging.getLogger(__name__)
_READ_BLOCK = 1024 * 1024
_PACKS_IN_FLIGHT = 2
_ZSTD_LEVEL = 1
_MAX_PIN_BYTES = 4096


@dataclass(frozen=True)
class CheckpointInfo:
    """What `list` shows of a checkpoint without reading its chunks."""

    id: str
    workload: str
    created: datetime
    size_bytes: int
    new_bytes: int
    metadata: dict[str, Any]


ProgressFn = Callable[[int], None]  # called with bytes just done


class Repository:
    """Checkpoints of workloads over any BlobStore. Safe to use from several threads.

    Commits run concurrently (each writes its own packs); garbage collection and spool
    shedding wait for them and run alone (a readers-writer lock). Across processes and hosts,
    a pack younger than the grace period is never collected: it may belong to a commit whose
    manifest is not written yet.
    """

    def __init__(
        self,
        backend: BlobStore,
        concurrency: int = 4,
        gc_grace: float = 6 * 3600,
        codec: Codec | None = None,
        heads: Heads | None = None,
    ) -> None:
        """`heads`: fenced mode (fleet), see storage/fencing.py."""
        self.backend = backend
        self.codec: Codec = codec or Plain()
        self.concurrency = max(1, concurrency)
        self.gc_grace = gc_grace
        self._lock = threading.Lock()
        self.gc_lock = RWLock()  # commits shared; storage/gc.py exclusive
        self.dedup = DedupIndex(self)
        self.fencing = Fencing(heads, backend, self._listed_ids) if heads else None
        # manifest key -> (info, packs): see _summary
        self._summaries: dict[str, tuple[CheckpointInfo, tuple[str, ...]]] = {}

    # -- write -------------------------------------------------------------------------

    def commit(
        self,
        workload: str,
        folder: Path,
        metadata: dict[str, Any] | None = None,
        generation: int | None = None,
    ) -> Manifest:
        """Store the files under `folder` as a new checkpoint of `workload`; return its
        manifest. Fenced (fleet): under `generation` (default: the one `fence` gave)."""
        check_workload_name(workload)
        fenced = self.fencing.generation(workload, generation) if self.fencing else None
        with self.gc_lock.shared():
            try:
                return self._commit(workload, folder, metadata or {}, fenced)
            except ReusedPacksGone as e:
                # Forgotten by the index now: this pass stores their chunks again (and
                # reuses the packs the first pass wrote).
                log.warning("%s; storing those chunks again", e)
            try:
                return self._commit(workload, folder, metadata or {}, fenced)
            except ReusedPacksGone as e:
                raise StorageError(f"{e}; nothing was committed") from e

    def fence(self, workload: str, generation: int | None) -> None:
        """This host owns `workload` under lease `generation` (fleet mode; None: no lease):
        from now on, commits and removals of older generations are refused by the store."""
        if self.fencing is not None and generation is not None:
            self.fencing.fence(workload, generation)

    def remove_strays(self, workload: str) -> list[str]:
        """Fleet mode: delete the manifests of `workload` its head does not name (a stale
        owner's commits), once older than the grace period; their ids."""
        return self.fencing.remove_strays(workload, self.gc_grace) if self.fencing else []

    def require_committed(self, workload: str, checkpoint_id: str) -> None:
        """CheckpointNotFound unless the checkpoint exists (in fleet mode: its head names it),
        whatever copy of it this host keeps locally."""
        if self.fencing is not None:
            self.fencing.require(workload, checkpoint_id)

    def _commit(
        self, workload: str, folder: Path, metadata: dict[str, Any], generation: int | None
    ) -> Manifest:
        index = self.dedup.current(workload)
        cid = new_checkpoint_id()
        writer = PackWriter(self.backend, self.codec, index, _PACKS_IN_FLIGHT, _ZSTD_LEVEL)
        used_packs: set[str] = set()
        files: list[FileEntry] = []
        size_bytes = total_chunks = 0
        buf = bytearray(_READ_BLOCK)
        try:
            for rel, path in image_files(folder):
                st = path.stat()
                digests = bytearray()
                with open(path, "rb", buffering=0) as f:
                    while n := read_full(f, buf):
                        writer.between_blocks()
                        block = memoryview(buf)[:n]
                        block_digests = self.codec.chunk_ids(block, CHUNK_SIZE)
                        digests += block_digests
                        where = index.lookup(block_digests)
                        total_chunks += len(where)
                        used_packs.update(index.pack_id(p) for p in np.unique(where[where >= 0]))
                        new = np.flatnonzero(where < 0)
                        pages = n // CHUNK_SIZE  # the file's short last chunk goes alone
                        used_packs |= writer.pack_pages(block_digests, block, new[new < pages])
                        for i in new[new >= pages].tolist():
                            digest = block_digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                            chunk = block[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
                            used_packs.add(writer.pack_of(digest, chunk))
                size_bytes += st.st_size
                files.append(FileEntry(rel, st.st_size, st.st_mode & 0o777, digests))
            writer.finish()
        finally:
            writer.close()
        new_bytes, new_chunks = writer.new_bytes, writer.new_chunks
        self._check_reused_packs(workload, used_packs - writer.written)

        manifest = Manifest(
            id=cid,
            workload=workload,
            created=datetime.now(UTC),
            chunk_size=CHUNK_SIZE,
            files=files,
            packs=sorted(used_packs),
            metadata=metadata,
            size_bytes=size_bytes,
            new_bytes=new_bytes,
            new_chunks=new_chunks,
            total_chunks=total_chunks,
        )
        key = manifest_key(workload, cid)
        self.backend.needs(
            key, [k for p in sorted(writer.written) for k in (pack_key(p), index_key(p))]
        )
        # Sealed and written a piece at a time: the whole manifest is never in memory.
        self.backend.put_pieces(key, lambda: self.codec.seal_stream(key, manifest.pieces()))
        if self.fencing is not None and generation is not None:
            self.fencing.committed(workload, cid, generation)
        info = CheckpointInfo(cid, workload, manifest.created, size_bytes, new_bytes, metadata)
        with self._lock:
            self._summaries[manifest_key(workload, cid)] = (info, tuple(manifest.packs))
        return manifest

    def _check_reused_packs(self, workload: str, reused: set[str]) -> None:
        self.dedup.check_reused(workload, reused)

    def known_chunks(self, workload: str | None = None) -> ChunkIndex | None:
        """The chunk index this process holds of `workload` (after its first commit of it),
        as it is, without loading or refreshing it: a lazy restore reads it as hints."""
        return self.dedup.known(workload) if workload is not None else None

    def packs_of_workload(self, workload: str) -> set[str]:
        """The packs the committed checkpoints of `workload` reference (what its commits may
        dedup against: storage/dedup_index.py)."""
        out: set[str] = set()
        for info in self.checkpoints(workload):
            with contextlib.suppress(StorageError):
                out.update(self.packs_of(workload, info.id))
        return out

    def forget_packs(self, pack_ids: set[str]) -> None:
        """Packs about to be deleted: no new checkpoint may reference them."""
        self.dedup.forget(pack_ids)

    def manifest_names(self, prefix: str = keys.MANIFESTS) -> list[keys.ObjectName]:
        """The manifests listed under `prefix` whose keys parse (anything else is not ours)."""
        return [n for k in self.backend.list(prefix) if (n := keys.parse_as(k, FileType.MANIFEST))]

    def referenced_packs(self, strict: bool) -> set[str]:
        """Every pack some manifest references.

        `strict` (garbage collection): a manifest that cannot be read stops it with an error,
        since its packs would otherwise count as unreferenced and be deleted. Otherwise
        (deciding what a commit may dedup against) it is skipped.
        """
        listed: set[str] = set()
        refs: set[str] = set()
        unreadable: list[str] = []
        for name in self.manifest_names():
            key = manifest_key(name.workload, name.id)
            listed.add(key)
            try:
                refs.update(self._summary(name.workload, name.id)[1])
            except CheckpointNotFound:
                continue  # deleted since the listing
            except StorageError as e:
                unreadable.append(f"{key}: {e}")
        with self._lock:
            for key in set(self._summaries) - listed:
                del self._summaries[key]
        if strict and unreadable:
            raise CorruptCheckpoint(
                f"{len(unreadable)} manifest(s) cannot be read, so the packs they reference are "
                f"unknown and nothing is collected: {unreadable[0]}"
                + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else "")
                + "; run `checkpointer verify` on them, and remove the ones that are damaged "
                "or not this repository's"
            )
        return refs

    # -- read --------------------------------------------------------------------------

    def _listed_ids(self, workload: str) -> list[str]:
        names = self.manifest_names(keys.manifests_of(workload))
        return [n.id for n in names if n.workload == workload]

    def checkpoints(self, workload: str) -> list[CheckpointInfo]:
        """Committed checkpoints of `workload`, newest first (fenced: in the head's order)."""
        if self.fencing is not None:
            out = []
            for cid in reversed(self.fencing.ids(workload)):
                # Unreadable: `verify` reports it. An outage is not unreadable: it raises.
                with contextlib.suppress(CheckpointNotFound, CorruptCheckpoint):
                    out.append(self._summary(workload, cid)[0])
            return out
        infos = []
        for name in self.manifest_names(keys.manifests_of(workload)):
            if name.workload != workload:
                continue
            try:
                infos.append(self.info(workload, name.id))
            except (CheckpointNotFound, CorruptCheckpoint):
                continue  # listed but unreadable: `verify` reports it; don't hide the others
        infos.sort(key=lambda i: i.id, reverse=True)
        return infos

    def info(self, workload: str, checkpoint_id: str) -> CheckpointInfo:
        """What `list` shows of one checkpoint, without its chunk list."""
        return self._summary(workload, checkpoint_id)[0]

    def packs_of(self, workload: str, checkpoint_id: str) -> tuple[str, ...]:
        return self._summary(workload, checkpoint_id)[1]

    def _summary(self, workload: str, checkpoint_id: str) -> tuple[CheckpointInfo, tuple[str, ...]]:
        """A checkpoint's info and packs. Manifests never change once written, so each is
        parsed once (a 1 GB image's manifest is ~11 MB of JSON, ~30 MB while parsed) and this
        small summary remembered; `delete` and listings forget the ones gone."""
        key = manifest_key(workload, checkpoint_id)
        with self._lock:
            cached = self._summaries.get(key)
        if cached is not None:
            return cached
        m = self.read_manifest(workload, checkpoint_id)
        summary = (
            CheckpointInfo(m.id, workload, m.created, m.size_bytes, m.new_bytes, m.metadata),
            tuple(m.packs),
        )
        with self._lock:
            self._summaries[key] = summary
        return summary

    def workloads(self) -> list[str]:
        return sorted({n.workload for n in self.manifest_names()})

    def read_manifest(self, workload: str, checkpoint_id: str) -> Manifest:
        check_workload_name(workload)
        if not is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFound(
                f"{checkpoint_id!r} is not a checkpoint id; "
                f"see `checkpointer list {workload}` for the ids"
            )
        key = manifest_key(workload, checkpoint_id)
        where = f"checkpoint {checkpoint_id} of {workload}"
        try:
            raw = self.codec.open(key, self.backend.get(key, MAX_MANIFEST_BYTES))
        except BlobNotFound as e:
            raise CheckpointNotFound(
                f"workload {workload} has no checkpoint {checkpoint_id}; "
                f"see `checkpointer list {workload}`"
            ) from e
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where}: {e}") from e
        manifest = Manifest.parse(raw, where)
        if manifest.id != checkpoint_id or manifest.workload != workload:
            raise CorruptCheckpoint(
                f"checkpoint {checkpoint_id} of {workload}: manifest names "
                f"{manifest.workload}/{manifest.id}"
            )
        return manifest

    def materialize(
        self,
        workload: str,
        checkpoint_id: str,
        dest: Path,
        progress: ProgressFn | None = None,
        seed: tuple[str, Path] | None = None,
    ) -> Manifest:
        """Rebuild the checkpointed folder in `dest` (created 0700), verifying every chunk.

        `seed` is (checkpoint id, folder): a folder the caller knows to hold exactly the files
        of another checkpoint of the same workload (the kept newest image); the chunks found
        there are copied from it instead of fetched. Raises CorruptCheckpoint naming the
        checkpoint if any chunk is missing or damaged. (The work: storage/rebuild.py.)
        """
        self.require_committed(workload, checkpoint_id)
        return materialize(self, workload, checkpoint_id, dest, progress, seed)

    def read_index(self, pack_id: str) -> IndexArrays:
        return pack_reading.read_index(self.backend, self.codec, pack_id)

    def index_for(self, pack_id: str, where: str) -> IndexArrays:
        return pack_reading.index_for(self.backend, self.codec, pack_id, where)

    def pack_for(
        self, pack_id: str, where: str, buffer: Callable[[int], bytearray] | None = None
    ) -> bytes | memoryview:
        """A pack's bytes, opened (storage/pack_reading.py)."""
        return pack_reading.pack_for(self.backend, self.codec, pack_id, where, buffer)

    def verify(
        self, workload: str, checkpoint_id: str, progress: ProgressFn | None = None
    ) -> Manifest:
        """Check every chunk of a checkpoint (its pack's tag, or its hash in a repository in
        clear) by materialising it into a private scratch folder. What is checked is the
        store's copy (the bucket's, not a local cache's), unless the checkpoint has not been
        uploaded yet."""
        source = self
        truth = self.backend.authoritative()
        if truth is not self.backend and not self.backend.is_pending(
            manifest_key(workload, checkpoint_id)
        ):
            source = Repository(truth, self.concurrency, self.gc_grace, self.codec)
        with tempfile.TemporaryDirectory(prefix="checkpointer-verify-") as tmp:
            return source.materialize(workload, checkpoint_id, Path(tmp) / "images", progress)

    def checkpoints_local(self, workload: str) -> list[CheckpointInfo]:
        """`checkpoints` from what this host holds locally (its spool and cache), for the one
        decision an outage allows (docs/fleet.md, R1): partial by nature, never a listing of
        the repository."""
        infos = []
        for key in self.backend.list_local(keys.manifests_of(workload)):
            name = keys.parse_as(key, FileType.MANIFEST)
            if name is None or name.workload != workload:
                continue
            with contextlib.suppress(StorageError):
                infos.append(self.info(workload, name.id))
        infos.sort(key=lambda i: i.id, reverse=True)
        return infos

    # -- delete and pins ---------------------------------------------------------------

    def delete(self, workload: str, checkpoint_id: str) -> None:
        """Forget a checkpoint. Its chunks stay until garbage collection finds them unused.

        The packs only it referenced leave the workload's chunk index first: dedup is per
        workload and only the workload's owner removes its checkpoints, so from here on no
        commit anywhere can reference them again, and another host's GC may delete them
        whenever it finds them unreferenced: GC cannot race a commit (docs/fleet.md, R3)."""
        key = manifest_key(workload, checkpoint_id)
        mine: set[str] = set()
        with contextlib.suppress(CorruptCheckpoint):  # a damaged manifest can still go
            mine = set(self._summary(workload, checkpoint_id)[1])  # unknown id: clear error
        still: set[str] = set()  # (forgetting more than needed only costs dedup)
        for c in self.checkpoints(workload):
            if c.id != checkpoint_id:
                with contextlib.suppress(StorageError):
                    still.update(self.packs_of(workload, c.id))
        self.dedup.forget_for(workload, mine - still)  # before it is gone, never after
        if self.fencing is not None:
            self.fencing.remove(workload, checkpoint_id)  # the head first: then it is gone
        self.backend.delete(key)
        with self._lock:
            self._summaries.pop(key, None)

    def pins(self, workload: str) -> set[str]:
        """Pinned checkpoint ids. A pin that does not open (planted) pins nothing."""
        return pins.pinned(self.backend, self.codec, workload)

    def pin(self, workload: str, checkpoint_id: str) -> None:
        self._summary(workload, checkpoint_id)  # a clear error for an unknown id
        pins.pin(self.backend, self.codec, workload, checkpoint_id)

    def unpin(self, workload: str, checkpoint_id: str) -> None:
        pins.unpin(self.backend, workload, checkpoint_id)


__all__ = ["CHUNK_SIZE", "BlobExists", "CheckpointInfo", "Repository"]
