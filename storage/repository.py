"""The repository: folders in, folders out, deduplicated by content.

Write path (commit, storage/committing.py): files cut into 4 KiB chunks, hashed, the chunks the
workload's index already holds only referenced, new ones packed by writer threads under the
workload's own prefix; packs and their indexes first, the manifest last: a checkpoint without
a manifest does not exist.

Read path (materialize, storage/rebuild.py): the manifest's packs are fetched a few at a time;
the chunks of a pack the checkpoint needs are found with one vectorised search, and each pack is
opened, decoded and written by one reader thread, one per core. Memory is a few pack-sized
buffers per thread plus 44 bytes a chunk, with no Python object per chunk. Where a pack lives
(its workload's prefix, or the legacy flat layout) is what its manifest says. A rebuild and a
lazy restore's file reader (storage/file_reader.py) read only through `PackReader`
(storage/pack_reading.py), which the repository implements: they never call back into it.

Encryption (storage/crypto.py) is the codec's business: chunk ids are keyed hashes, and every
object is sealed under its own name. A sealed pack's tag verifies all its frames in one call,
so an encrypted repository skips the per-chunk re-hash of restores. Everything read back is
hostile input until it opens: sizes are capped before reading (storage/pack_reading.py),
manifests are validated (storage/manifest.py), files are created only by flat name inside the
image folder.

Kept elsewhere, each a job of its own: fleet mode's head writes, with retention riding on them
and the dropped list (storage/fencing.py); the chunk indexes commits dedup against
(storage/dedup_index.py, storage/chunk_index.py); the manifests' summaries
(storage/summaries.py); garbage collection and spool shedding (storage/gc.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from storage import keys, marks, pins
from storage.annotations import Annotations
from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.clock import SYSTEM, Clock
from storage.committing import Target, write_checkpoint
from storage.crypto import Codec, Plain
from storage.dedup_index import DedupIndex, ReusedPacksGone
from storage.errors import (
    BlobExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    StorageError,
)
from storage.fencing import Fencing, Planner, Tidied
from storage.heads import Heads
from storage.keys import FileType, manifest_key
from storage.manifest import (
    CHUNK_SIZE,
    Manifest,
    check_workload_name,
)
from storage.pack_reading import Buffer, PackReader, StoreReader
from storage.packs import IndexArrays
from storage.rebuild import ProgressFn, materialize
from storage.rwlock import RWLock
from storage.summaries import CheckpointInfo, References, Summaries, Summary

log = logging.getLogger(__name__)


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
        clock: Clock = SYSTEM,
    ) -> None:
        """`heads`: fenced mode (fleet), see storage/fencing.py. `clock`: what commits, the
        dedup index and garbage collection read the time from (storage/clock.py)."""
        self.backend = backend
        self.codec: Codec = codec or Plain()
        self.concurrency = max(1, concurrency)
        self.gc_grace = gc_grace
        self.clock = clock
        self.gc_lock = RWLock()  # commits shared; storage/gc.py exclusive
        self.reader = StoreReader(backend, self.codec, self.concurrency)
        self.dedup = DedupIndex(self)
        self.fencing = Fencing(heads, backend, self._listed_ids, clock) if heads else None
        self.annotations = Annotations(backend, self.codec)  # pins and marks, as last seen
        self._summaries = Summaries(self.read_manifest)
        # Set by garbage collection once it found the legacy flat layout empty: this version
        # writes no flat packs, so this process never lists it again (storage/gc.py).
        self.flat_layout_empty = False

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

    def disown(self, workload: str) -> None:
        """This host lost or gave up the lease of `workload`: its grace times, retention
        planner, generation and view of pins and marks go (storage/fencing.py)."""
        if self.fencing is not None:
            self.fencing.disown(workload)
            self.annotations.forget(workload)

    def remove_strays(self, workload: str) -> list[str]:
        """Fleet mode: delete the manifests of `workload` its head does not name (a stale
        owner's commits, checkpoints retention dropped), once unnamed for the grace period;
        their ids (`tidy`)."""
        return self.tidy(workload).deleted

    def tidy(self, workload: str) -> Tidied:
        """Fleet mode, the owner's hourly job for `workload` (storage/fencing.py): pins and
        marks listed afresh, dropped checkpoints pinned or newest-verified since named
        again, the manifests unnamed for the grace period deleted."""
        if self.fencing is None:
            return Tidied()
        fencing = self.fencing
        fencing.generation(workload)  # NotFenced before any request
        self.annotations.refresh(workload)
        pinned = self.annotations.pins(workload)
        verified = {c for c, m in self.annotations.marks(workload).items() if m.verified}

        def rescue(dropped: set[str]) -> set[str]:
            named = set(fencing.view(workload))
            newest = max(verified & named, default="")
            return {c for c in dropped if c in pinned or (c in verified and c > newest)}

        def delete(ids: set[str], remaining: set[str]) -> None:
            self._forget_only(workload, ids, remaining)
            for cid in sorted(ids):
                key = manifest_key(workload, cid)
                self.backend.delete(key)
                self._summaries.drop(key)
            gone = ids & set(self.annotations.marks(workload))
            if gone:
                marks.remove(self.backend, workload, gone)
                self.annotations.unmarked(workload, gone)

        with self.gc_lock.exclusive():
            return fencing.tidy(workload, self.gc_grace, rescue, delete)

    def plan_with(self, workload: str, planner: Planner | None) -> None:
        """Fleet mode: the retention a commit's head write applies (storage/fencing.py)."""
        if self.fencing is not None:
            self.fencing.plan_with(workload, planner)

    def retire(self, workload: str, ids: set[str]) -> None:
        """Retention's removal: in fleet mode the head drops them (their manifests go in
        the owner's job, after the grace); else deleted at once."""
        if self.fencing is None:
            for cid in sorted(ids):
                self.delete(workload, cid)
            return
        self.fencing.retire(workload, ids)

    def retention_view(self, workload: str) -> list[CheckpointInfo]:
        """`checkpoints` for retention: in fleet mode from the head this process last read
        or wrote (no request in the steady state; the head write that drops checks it)."""
        if self.fencing is None:
            return self.checkpoints(workload)
        return self._infos(workload, self.fencing.view(workload))

    def require_committed(self, workload: str, checkpoint_id: str) -> None:
        """CheckpointNotFound unless the checkpoint exists (in fleet mode: its head names it),
        whatever copy of it this host keeps locally."""
        if self.fencing is not None:
            self.fencing.require(workload, checkpoint_id)

    def _commit(
        self, workload: str, folder: Path, metadata: dict[str, Any], generation: int | None
    ) -> Manifest:
        manifest = write_checkpoint(
            Target(self.backend, self.codec, self.dedup, self.clock), workload, folder, metadata
        )
        # Remembered first: the head write that names it applies retention, which reads it.
        self._summaries.put(manifest)
        if self.fencing is not None and generation is not None:
            self.fencing.committed(workload, manifest.id, generation)
        return manifest

    def known_chunks(self, workload: str | None = None) -> ChunkIndex | None:
        """The chunk index this process holds of `workload` (after its first commit of it),
        as it is, without loading or refreshing it: a lazy restore reads it as hints."""
        return self.dedup.known(workload) if workload is not None else None

    def packs_of_workload(self, workload: str) -> set[str]:
        """The packs under the workload's prefix that its committed checkpoints reference:
        what its commits may dedup against (storage/dedup_index.py). Legacy flat packs are
        never reused: a new manifest names packs of its workload's prefix only."""
        out: set[str] = set()
        for info in self.checkpoints(workload):
            with contextlib.suppress(StorageError):
                summary = self._summary(workload, info.id)
                if summary.home == workload:
                    out.update(summary.packs)
        return out

    def keep_only(self, workloads: Iterable[str]) -> None:
        """Hold chunk indexes and manifest summaries of these workloads only (this host's
        own): what a workload that moved away left in memory goes."""
        keep = set(workloads)
        self.dedup.keep_only(keep)
        self._summaries.keep_workloads(keep)
        self.annotations.keep_only(keep)
        if self.fencing is not None:
            self.fencing.keep_only(keep)

    def forget_packs(self, pack_ids: set[str]) -> None:
        """Packs about to be deleted: no new checkpoint may reference them."""
        self.dedup.forget(pack_ids)

    def manifest_names(self, prefix: str = keys.MANIFESTS) -> list[keys.ObjectName]:
        """The manifests listed under `prefix` whose keys parse (anything else is not ours)."""
        return [n for k in self.backend.list(prefix) if (n := keys.parse_as(k, FileType.MANIFEST))]

    def references(self, prefix: str) -> References:
        """The packs every manifest listed under `prefix` references, by where they live
        (garbage collection: storage/gc.py; a manifest that cannot be read is reported)."""
        return self._summaries.references(prefix, self.manifest_names(prefix))

    def flat_references(self) -> References:
        """The legacy flat packs every manifest of the repository references (the legacy
        collection, while flat packs remain: storage/gc.py)."""
        return self._summaries.flat_references(self.manifest_names())

    # -- read --------------------------------------------------------------------------

    def _listed_ids(self, workload: str) -> list[str]:
        names = self.manifest_names(keys.manifests_of(workload))
        return [n.id for n in names if n.workload == workload]

    def checkpoints(self, workload: str) -> list[CheckpointInfo]:
        """Committed checkpoints of `workload`, newest first (fenced: in the head's order)."""
        if self.fencing is not None:
            return self._infos(workload, self.fencing.ids(workload))
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

    def _infos(self, workload: str, chain: list[str]) -> list[CheckpointInfo]:
        out = []
        for cid in reversed(chain):
            # Unreadable: `verify` reports it. An outage is not unreadable: it raises.
            with contextlib.suppress(CheckpointNotFound, CorruptCheckpoint):
                out.append(self._summary(workload, cid).info)
        return out

    def info(self, workload: str, checkpoint_id: str) -> CheckpointInfo:
        """What `list` shows of one checkpoint, without its chunk list."""
        return self._summary(workload, checkpoint_id).info

    def packs_of(self, workload: str, checkpoint_id: str) -> tuple[str, ...]:
        return self._summary(workload, checkpoint_id).packs

    def _summary(self, workload: str, checkpoint_id: str) -> Summary:
        """A checkpoint's info and packs, each manifest read once (storage/summaries.py)."""
        return self._summaries.get(workload, checkpoint_id)

    def workloads(self) -> list[str]:
        return sorted({n.workload for n in self.manifest_names()})

    def read_manifest(self, workload: str, checkpoint_id: str) -> Manifest:
        """The checkpoint's manifest, opened and validated (storage/pack_reading.py)."""
        return self.reader.read_manifest(workload, checkpoint_id)

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

    # The reads of a rebuild and a lazy restore (`PackReader`, storage/pack_reading.py).

    def read_index(self, pack_id: str, home: str | None) -> IndexArrays:
        """A pack's index; `home` is where its manifest says it lives (`Manifest.pack_home`)."""
        return self.reader.read_index(pack_id, home)

    def index_for(self, pack_id: str, home: str | None, where: str) -> IndexArrays:
        return self.reader.index_for(pack_id, home, where)

    def pack_for(
        self, pack_id: str, home: str | None, where: str, buffer: Buffer | None = None
    ) -> bytes | memoryview:
        return self.reader.pack_for(pack_id, home, where, buffer)

    def pack_range(
        self, pack_id: str, home: str | None, offset: int, length: int
    ) -> tuple[bytes, int]:
        return self.reader.pack_range(pack_id, home, offset, length)

    def verify(
        self, workload: str, checkpoint_id: str, progress: ProgressFn | None = None
    ) -> Manifest:
        """Check every chunk of a checkpoint (its pack's tag, or its hash in a repository in
        clear) by materialising it into a private scratch folder. What is checked is the
        store's copy (the bucket's, not a local cache's), unless the checkpoint has not been
        uploaded yet."""
        # A stray (a manifest its head does not name) is no checkpoint, whatever its chunks.
        self.require_committed(workload, checkpoint_id)
        truth = self.backend.authoritative()
        source: PackReader = self
        if truth is not self.backend and not self.backend.is_pending(
            manifest_key(workload, checkpoint_id)
        ):
            source = StoreReader(truth, self.codec, self.concurrency)  # the bucket's copy
        with tempfile.TemporaryDirectory(prefix="checkpointer-verify-") as tmp:
            return materialize(source, workload, checkpoint_id, Path(tmp) / "images", progress)

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
        self._summary_or_clear_error(workload, checkpoint_id)
        others = {c.id for c in self.checkpoints(workload)} - {checkpoint_id}
        self._forget_only(workload, {checkpoint_id}, others)  # before it is gone, never after
        if self.fencing is not None:
            self.fencing.remove(workload, checkpoint_id)  # the head first: then it is gone
        self.backend.delete(key)
        self._summaries.drop(key)

    def _summary_or_clear_error(self, workload: str, checkpoint_id: str) -> None:
        with contextlib.suppress(CorruptCheckpoint):  # a damaged manifest can still go
            self._summary(workload, checkpoint_id)  # an unknown id: a clear error

    def _forget_only(self, workload: str, ids: set[str], others: set[str]) -> None:
        """The packs only the checkpoints `ids` reference (not `others`) leave the
        workload's index (forgetting more than needed only costs dedup)."""
        mine: set[str] = set()
        still: set[str] = set()
        for group, cids in ((mine, ids), (still, others - ids)):
            for cid in cids:
                with contextlib.suppress(StorageError):
                    group.update(self.packs_of(workload, cid))
        self.dedup.forget_for(workload, mine - still)

    def pins(self, workload: str) -> set[str]:
        """Pinned checkpoint ids, listed now. A pin that does not open (planted) pins nothing."""
        return pins.pinned(self.backend, self.codec, workload)

    def pin(self, workload: str, checkpoint_id: str) -> None:
        self._summary(workload, checkpoint_id)  # a clear error for an unknown id
        pins.pin(self.backend, self.codec, workload, checkpoint_id)
        self.annotations.pinned(workload, checkpoint_id, True)

    def unpin(self, workload: str, checkpoint_id: str) -> None:
        pins.unpin(self.backend, workload, checkpoint_id)
        self.annotations.pinned(workload, checkpoint_id, False)

    def write_mark(self, workload: str, mark: marks.Mark) -> None:
        """Store a drill's verdict on a checkpoint (storage/marks.py); retention's view of
        the marks has it at once."""
        marks.write(self.backend, self.codec, workload, mark)
        self.annotations.marked(workload, mark)


__all__ = ["CHUNK_SIZE", "BlobExists", "CheckpointInfo", "ProgressFn", "Repository"]
