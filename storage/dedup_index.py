"""The chunk index a commit dedups against: which packs hold which chunks, and which of them
a new checkpoint may still reference.

Kept per process, refreshed from the store every KNOWN_TTL, trimmed of what GC collects here,
and never trusted blindly for packs other hosts may collect (docs/fleet.md, R2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from storage import keys
from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.errors import BlobNotFound, CorruptCheckpoint, StorageError, TransientStorageError
from storage.keys import FileType, index_key
from storage.packs import IndexArrays, pack_created

log = logging.getLogger(__name__)
KNOWN_TTL = 900.0  # reload the digests of other writers' packs this often


class ReusedPacksGone(StorageError):
    """A commit referenced packs the store cannot vouch for; they were forgotten."""


class PackSource(Protocol):
    """What the index needs of the repository."""

    backend: BlobStore
    gc_grace: float
    concurrency: int

    def referenced_packs(self, strict: bool) -> set[str]: ...

    def read_index(self, pack_id: str) -> IndexArrays: ...


class DedupIndex:
    def __init__(self, repo: PackSource) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._index: ChunkIndex | None = None  # durable packs only
        self._index_at = 0.0

    def check_reused(self, workload: str, reused: set[str]) -> None:
        """The packs a commit reuses must be in the store when its manifest is written
        (restic checks the same): another host's GC collects a pack once every checkpoint
        naming it is gone, and no cache here can know that (docs/fleet.md, R2). Packs
        younger than half the grace period are safe (GC spares them a whole grace); every
        other one is looked up in the store, those of the workload's newest checkpoint
        included (another host may have removed that checkpoint too). A pack the store
        says is gone, or that it cannot vouch for (unreachable), is forgotten, and the
        commit stores its chunks again: checkpoints go on during an outage, without dedup."""
        cutoff = time.time() - self.repo.gc_grace / 2
        at_risk = sorted(p for p in reused if pack_created(p) < cutoff)
        if not at_risk:
            return

        def gone(pid: str) -> bool:
            try:
                return not self.repo.backend.exists(index_key(pid))
            except StorageError:
                return True  # cannot vouch for it: don't reference it

        with ThreadPoolExecutor(self.repo.concurrency, thread_name_prefix="recheck") as pool:
            missing = {p for p, out in zip(at_risk, pool.map(gone, at_risk), strict=True) if out}
        if missing:
            self.forget(missing)
            raise ReusedPacksGone(
                f"{len(missing)} of the {len(at_risk)} older pack(s) this checkpoint of "
                f"{workload} reuses are not in the store (collected by another host, or the "
                "store cannot say)"
            )

    def current(self) -> ChunkIndex:
        """The chunks a new checkpoint may reference, by pack.

        A pack is trusted if a manifest references it, or if it is young: an old pack that no
        manifest references (a killed writer's) may be collected by another host at any moment.
        """
        with self._lock:
            if self._index is not None and time.monotonic() - self._index_at < KNOWN_TTL:
                return self._index
        listed_at = time.time()
        try:
            fresh = self._from_store(listed_at)
        except TransientStorageError as e:
            # The bucket cannot be listed: go on with what this process knows (nothing, at
            # first), refreshing at the next commit. Safe: every older pack reused is looked
            # up before the manifest (check_reused), and during the outage that look-up
            # fails, so its chunks are stored again; only young packs are reused unchecked.
            log.warning("chunk index not refreshed, object storage unreachable: %s", e)
            with self._lock:
                if self._index is None:
                    self._index = ChunkIndex()
                return self._index
        with self._lock:
            if self._index is not None:
                # Keep what this process's commits added while we listed, and nothing older:
                # a pack that was in the old index but is not listed now was collected
                # (perhaps by another host), and a new checkpoint must never reference it.
                self._index.merge_into(fresh, lambda pid: pack_created(pid) >= listed_at - 2)
            self._index, self._index_at = fresh, time.monotonic()
            return fresh

    def _from_store(self, listed_at: float) -> ChunkIndex:
        referenced = self.repo.referenced_packs(strict=False)
        cutoff = listed_at - self.repo.gc_grace / 2

        def trusted() -> Iterator[tuple[str, bytes]]:
            for key in self.repo.backend.list(keys.PACKS):
                name = keys.parse_as(key, FileType.INDEX)
                if name is None:
                    continue
                if name.id not in referenced and pack_created(name.id) < cutoff:
                    continue
                try:
                    yield name.id, self.repo.read_index(name.id).digests
                except (BlobNotFound, CorruptCheckpoint):
                    continue  # collected meanwhile, or damaged: don't dedup against it

        fresh = ChunkIndex()
        fresh.add_many(trusted())
        return fresh

    def known(self) -> ChunkIndex | None:
        """The chunk index this process holds (after its first commit), as it is, without
        loading or refreshing it: a lazy restore reads it as hints of where chunks are."""
        with self._lock:
            return self._index

    def forget(self, pack_ids: set[str]) -> None:
        """Packs about to be deleted: no new checkpoint may reference them."""
        with self._lock:
            if self._index is not None:
                self._index.forget(pack_ids)
