"""The chunk indexes commits dedup against, one per workload: which packs hold which chunks,
and which of them a new checkpoint may still reference.

Scoped to the workload (docs/fleet.md, R3): a commit of W reuses only packs W's committed
checkpoints reference, or that this process wrote for W. Measured on the bench's workloads
(`python -m bench.cross_dedup`), dedup across workloads saved nothing worth keeping (0.0% of
the bytes stored, 1.4% at most between two Redis holding the same data: allocators and ASLR
place equal data on different pages), while a fleet-wide index costs every host the whole
fleet's digests in memory and a read of every pack index in the bucket at every refresh.
Per workload, a host holds the indexes of its own workloads only (`keep_only`: garbage
collection drops those of workloads that moved away), reads a pack's index once (digests never
change), and a refresh reads only the packs it does not hold yet. The packs are those under the
workload's own prefix (storage/keys.py): legacy flat packs are never reused, so a new
manifest never names a pack outside its workload's prefix.

Never trusted blindly for packs other hosts may collect (docs/fleet.md, R2).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.clock import Clock
from storage.errors import BlobNotFound, CorruptCheckpoint, StorageError, TransientStorageError
from storage.keys import index_key
from storage.packs import IndexArrays, pack_created

log = logging.getLogger(__name__)
KNOWN_TTL = 900.0  # reload the digests of other writers' packs this often
_FORGOTTEN_KEPT = 1000  # removals remembered for refreshes under way (minutes of them)


class ReusedPacksGone(StorageError):
    """A commit referenced packs the store cannot vouch for; they were forgotten."""


class PackSource(Protocol):
    """What the index needs of the repository."""

    backend: BlobStore
    gc_grace: float
    concurrency: int
    clock: Clock  # the grace's age of packs, the refresh's

    def packs_of_workload(self, workload: str) -> set[str]: ...

    def read_index(self, pack_id: str, home: str | None) -> IndexArrays: ...


class DedupIndex:
    def __init__(self, repo: PackSource) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._indexes: dict[str, tuple[ChunkIndex, float]] = {}  # workload -> (index, when)
        # Packs forgotten, in order (workload, or None: every workload's), so that a refresh
        # built while a removal forgot some does not bring them back.
        self._forgotten: list[tuple[str | None, frozenset[str]]] = []
        self._forgotten_base = 0  # how many entries were dropped from the front

    def check_reused(self, workload: str, reused: set[str]) -> None:
        """The packs a commit reuses must be in the store when its manifest is written
        (restic checks the same): another host's GC collects a pack once every checkpoint
        naming it is gone, and no cache here can know that (docs/fleet.md, R2). Packs
        younger than half the grace period are safe (GC spares them a whole grace); every
        other one is looked up in the store, those of the workload's newest checkpoint
        included (another host may have removed that checkpoint too). A pack the store
        says is gone, or that it cannot vouch for (unreachable), is forgotten, and the
        commit stores its chunks again: checkpoints go on during an outage, without dedup."""
        cutoff = self.repo.clock.wall() - self.repo.gc_grace / 2
        at_risk = sorted(p for p in reused if pack_created(p) < cutoff)
        if not at_risk:
            return

        def gone(pid: str) -> bool:
            try:
                return not self.repo.backend.exists(index_key(pid, workload))
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

    def current(self, workload: str) -> ChunkIndex:
        """The chunks a new checkpoint of `workload` may reference, by pack: those of its
        committed checkpoints, and those this process's commits of it added (until a refresh
        finds them referenced by none: a failed commit's)."""
        with self._lock:
            held = self._indexes.get(workload)
            if held is not None and self.repo.clock.monotonic() - held[1] < KNOWN_TTL:
                return held[0]
        listed_at = self.repo.clock.wall()
        old = held[0] if held is not None else None
        with self._lock:
            mark = self._forgotten_base + len(self._forgotten)
        try:
            fresh = self._from_store(workload, old, listed_at)
        except TransientStorageError as e:
            # The bucket cannot be listed: go on with what this process knows (nothing, at
            # first), refreshing at the next commit. Safe: every older pack reused is looked
            # up before the manifest (check_reused), and during the outage that look-up
            # fails, so its chunks are stored again; only young packs are reused unchecked.
            log.warning("chunk index of %s not refreshed: %s", workload, e)
            with self._lock:
                index = old if old is not None else ChunkIndex()
                self._indexes.setdefault(workload, (index, 0.0))
                return self._indexes[workload][0]
        with self._lock:
            since = self._forgotten[max(0, mark - self._forgotten_base) :]
            for who, packs in since:
                if who is None or who == workload:
                    fresh.forget(set(packs))
            self._indexes[workload] = (fresh, self.repo.clock.monotonic())
        return fresh

    def _from_store(self, workload: str, old: ChunkIndex | None, listed_at: float) -> ChunkIndex:
        referenced = self.repo.packs_of_workload(workload)
        known = old.held_packs() if old is not None else set()

        def unread() -> Iterator[tuple[str, bytes]]:
            for pid in sorted(referenced - known):
                try:
                    yield pid, self.repo.read_index(pid, workload).digests
                except (BlobNotFound, CorruptCheckpoint):
                    continue  # collected meanwhile, or damaged: don't dedup against it

        fresh = ChunkIndex()
        fresh.add_many(unread())
        if old is not None:
            # What it held and is still referenced, and what commits added while we listed
            # (nothing older: a pack referenced by none was a failed commit's, or collected).
            old.merge_into(
                fresh, lambda pid: pid in referenced or pack_created(pid) >= listed_at - 2
            )
        return fresh

    def known(self, workload: str) -> ChunkIndex | None:
        """The chunk index this process holds of `workload` (after its first commit), as it
        is, without loading or refreshing it: a lazy restore reads it as hints."""
        with self._lock:
            held = self._indexes.get(workload)
            return held[0] if held is not None else None

    def keep_only(self, workloads: set[str]) -> None:
        """Drop the indexes of every other workload: memory bounded by this host's own."""
        with self._lock:
            for w in set(self._indexes) - workloads:
                del self._indexes[w]

    def forget(self, pack_ids: set[str]) -> None:
        """Packs about to be deleted: no new checkpoint may reference them."""
        with self._lock:
            indexes = [index for index, _ in self._indexes.values()]
            self._log_forgotten(None, pack_ids)
        for index in indexes:
            index.forget(pack_ids)

    def forget_for(self, workload: str, pack_ids: set[str]) -> None:
        """Packs no checkpoint of `workload` references any more (one was removed)."""
        with self._lock:
            held = self._indexes.get(workload)
            self._log_forgotten(workload, pack_ids)
        if held is not None and pack_ids:
            held[0].forget(pack_ids)

    def _log_forgotten(self, workload: str | None, pack_ids: set[str]) -> None:
        """Called with the lock held."""
        if pack_ids:
            self._forgotten.append((workload, frozenset(pack_ids)))
        if len(self._forgotten) > _FORGOTTEN_KEPT:
            drop = len(self._forgotten) - _FORGOTTEN_KEPT
            del self._forgotten[:drop]
            self._forgotten_base += drop

    def expire(self) -> None:
        """Refresh every index at its next use (tests; after a restore of the store)."""
        with self._lock:
            self._indexes = {w: (index, 0.0) for w, (index, _) in self._indexes.items()}
