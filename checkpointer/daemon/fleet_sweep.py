"""The sweep's reading of `leases/` (fleet_scan.py says what it is for): every lease of the
bucket, read again only when its version changed, a few at a time.

A sweep lists `leases/` with versions (1,000 a request) and queues the leases whose version
changed since they were last read (or listed); each scan then reads what fits in its share of
the scan period (`read_some`). A lease this host never read, unchanged since it was first
listed here, is read only by the hosts it is the turn of should its holder die (the first
FALLBACKS + 1 of its rendezvous order, fleet_rank.py) and by its holder: reading every lease
once, every host, made each host's first sweep N GETs, the fleet's H x N (1,000,000 GETs at 100
hosts x 10,000 workloads, ~280 GET/s on `leases/` averaged over bench.fleet_scale's hour, 2,492
of them throttled at 15 ms), where ~3 x N does what a first sweep is for: orphans and holders
without heartbeat are found by the hosts that would take them over.

Skipped is not forgotten: a lease skipped here is asked about again at every sweep (`ours`,
no request), and read once it is this host's to read. A held lease never changes until it
moves (it is not renewed), so a host that skipped one would otherwise never read it, and a
dead holder's lease that its first ranked hosts all refused (a CPU the checkpoint does not
fit), or that they were not there to take (died too, draining, failover off), was never
offered to anyone else. `ours` (fleet_scan.py) answers yes for the workloads of a host judged
dead here (about one GET per dead workload per host, what a lease that changes costs anyway)
and, for the rest, for one more rank of the rendezvous order every ESCALATE_EVERY a lease
stays unread here: an orphan whose first ranked hosts refuse reaches every host in the end.
So the H x N reads of every host reading every lease once still come, for the leases that
stay unchanged that long, but spread over H x ESCALATE_EVERY (17 h at 100 hosts): N /
ESCALATE_EVERY GET/s for the fleet (17 at 10,000 workloads), not 1,000,000 at once.

Read all at once, on the scan's thread, the first sweep at 10,000 workloads took 1,000 s at
100 ms a request: no listing of `hosts/` all that time, so a host that died meanwhile was
found only after it (the 470 s failover of bench.fleet_scale at 100 hosts x 10,000 workloads,
100 ms). Read a share a scan, liveness keeps its period; a long sweep takes longer, which only
delays what the sweep is the backstop for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from storage.backends.base import BlobStore
from storage.errors import CorruptCheckpoint, StorageError
from storage.keys import LEASES, FileType, parse_as
from storage.leases import Lease, Leases

log = logging.getLogger(__name__)

# The share of each scan period the sweep's reads may take: the rest keeps the listing of
# `hosts/` on time (a third of 3 s: 10 reads a scan at 100 ms a request, 66 at 15 ms).
SWEEP_SHARE = 1 / 3


class LeaseSweep:
    """Every lease of the bucket as last read, and the ones to read again."""

    def __init__(
        self, store: BlobStore, leases: Leases, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.leases = leases
        self.monotonic = monotonic
        self._cache: dict[str, tuple[str, Lease | None]] = {}  # workload -> (version, lease)
        self._queue: dict[str, str] = {}  # workload -> version listed, not read yet
        # workload -> (version listed, when first listed unchanged): not ours to read yet
        self._skipped: dict[str, tuple[str, float]] = {}

    def list_changed(
        self, ours: Callable[[str, float], bool] = lambda workload, unread: True
    ) -> set[str]:
        """List `leases/` with versions: forget the leases gone, queue the changed ones (a
        new sweep's queue replaces what the last one did not read yet). A lease never read
        here is queued only if `ours(workload, seconds listed unread here)`, asked again at
        every sweep while its version stays; a new version is queued whatever `ours` says.
        Returns the listed workloads."""
        listed: dict[str, str] = {}
        for key, version in self.store.list_versions(LEASES):
            name = parse_as(key, FileType.LEASE)
            if name is not None:
                listed[name.workload] = version
        for gone in self._cache.keys() - listed.keys():
            del self._cache[gone]
        for gone in self._skipped.keys() - listed.keys():
            del self._skipped[gone]
        self._queue = {}
        now = self.monotonic()
        for workload, version in listed.items():
            skipped = self._skipped.get(workload)
            if skipped is not None:
                if skipped[0] != version or ours(workload, now - skipped[1]):
                    self._queue[workload] = version
            elif workload in self._cache:
                if self._cache[workload][0] != version:
                    self._queue[workload] = version
            elif ours(workload, 0.0):
                self._queue[workload] = version
            else:
                self._skipped[workload] = (version, now)
        return set(listed)

    def unchanged(self) -> list[Lease]:
        """The leases read before whose version the last listing showed again."""
        return [
            lease
            for w, (_, lease) in self._cache.items()
            if lease is not None and w not in self._queue
        ]

    @property
    def pending(self) -> int:
        return len(self._queue)

    def read_some(self, until: float) -> list[Lease]:
        """Read queued leases until monotonic `until` (at least one); the leases read.
        Unreadable or replayed leases lease nothing (and are not read again until they
        change); one the store does not answer for is read at the next sweep."""
        out: list[Lease] = []
        while self._queue:
            workload = next(iter(self._queue))
            version = self._queue.pop(workload)
            try:
                held = self.leases.read(workload)
            except CorruptCheckpoint:  # planted, damaged or replayed
                self._skipped.pop(workload, None)
                self._cache[workload] = (version, None)
            except StorageError as e:  # still skipped, if it was: asked about again
                log.warning("fleet: sweep: cannot read the lease of %s: %s", workload, e)
            else:
                self._skipped.pop(workload, None)
                if held is None:
                    self._cache.pop(workload, None)
                else:
                    self._cache[workload] = (held.version, held.lease)
                    out.append(held.lease)
            if self.monotonic() >= until:
                break
        return out

    def run(self) -> list[Lease]:
        """A whole sweep at once: list, read every changed lease; every lease known."""
        self.list_changed()
        self.read_some(float("inf"))
        return [lease for _, lease in self._cache.values() if lease is not None]

    def cached(self, holder: str) -> set[str]:
        """The workloads whose lease, as last read, `holder` holds."""
        return {
            lease.workload
            for _, lease in self._cache.values()
            if lease is not None and lease.holder == holder
        }
