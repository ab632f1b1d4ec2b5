"""What this host watches of the others (fleet mode, issue 27): per tick one listing of
`hosts/`, whatever the number of workloads; the leases of a host only once it is found dead;
and a slow sweep of `leases/`.

- The listing gives each heartbeat's version (no GET). A version unchanged for TTL + skew on
  this host's monotonic clock makes its host a suspect: its heartbeat is read once, and if it
  is still that version (and its own TTL has passed too) the host is dead
  (storage/heartbeats.py Liveness). Then the leases of the workloads it listed (and fetched
  ahead) are read, and each still held by it is offered for failover. Those not taken are
  looked at again every DEAD_RETRY seconds until they are, or the host comes back.
- The sweep, every SWEEP_EVERY seconds, lists `leases/` (1,000 a request) with versions and
  reads only the leases whose version changed since the last sweep. It finds what no
  heartbeat names: a lease whose holder died between writing it and its first heartbeat, or
  whose holder has no heartbeat at all (dead after TTL + skew from when it was noticed); a
  lease of this host taken by another (the copy here is then lost); and it keeps the view of
  who owns what (`checkpointer status`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checkpointer.daemon.lease_watchdog import LeaseWatchdog
from storage.backends.base import BlobStore
from storage.errors import CorruptCheckpoint, StorageError
from storage.heartbeats import MISSING, Heartbeats, Liveness
from storage.keys import LEASES, FileType, parse_as
from storage.leases import Lease, Leases, LeaseState

log = logging.getLogger(__name__)

SWEEP_EVERY = 600.0  # seconds between sweeps of leases/ (Fleet.sweep_every)
DEAD_RETRY = 60.0  # seconds between looks at a dead host's leases not taken yet


@dataclass
class _Dead:
    """A host found dead: the workloads to look at, and when next."""

    names: set[str] = field(default_factory=set)
    next_look: float = float("-inf")


class LeaseSweep:
    """Every lease of the bucket, read again only when its version changed."""

    def __init__(self, store: BlobStore, leases: Leases) -> None:
        self.store = store
        self.leases = leases
        self._cache: dict[str, tuple[str, Lease | None]] = {}  # workload -> (version, lease)

    def run(self) -> list[Lease]:
        """List `leases/` with versions; GET the changed ones. Unreadable or replayed leases
        lease nothing (and are not read again until they change)."""
        listed: dict[str, str] = {}
        for key, version in self.store.list_versions(LEASES):
            name = parse_as(key, FileType.LEASE)
            if name is not None:
                listed[name.workload] = version
        for gone in self._cache.keys() - listed.keys():
            del self._cache[gone]
        for workload, version in listed.items():
            cached = self._cache.get(workload)
            if cached is not None and cached[0] == version:
                continue
            try:
                held = self.leases.read(workload)
            except CorruptCheckpoint:  # planted, damaged or replayed
                self._cache[workload] = (version, None)
                continue
            except StorageError as e:
                log.warning("fleet: sweep: cannot read the lease of %s: %s", workload, e)
                continue
            if held is None:
                self._cache.pop(workload, None)
            else:
                self._cache[workload] = (held.version, held.lease)
        return [lease for _, lease in self._cache.values() if lease is not None]

    def cached(self, holder: str) -> set[str]:
        """The workloads whose lease, as last swept, `holder` holds."""
        return {
            lease.workload
            for _, lease in self._cache.values()
            if lease is not None and lease.holder == holder
        }


def taken_from(ours: Lease, found: Lease) -> bool:
    """Whether `found` (read later than we wrote `ours`, or from an older listing) says the
    workload moved on without us: a newer step of its history, or our generation with
    another holder. An older one is a listing from before our write: nothing."""
    if found.holder == ours.holder and found.generation == ours.generation:
        return found.state in (LeaseState.HANDED, LeaseState.RELEASED)
    return found.order() > ours.order() or found.generation == ours.generation


class Watcher:
    """The other hosts as this host sees them. `act_on(lease, holder_dead)`: what a lease
    asks of this host (Fleet._act_on); `watchdog`: this host's own leases."""

    def __init__(
        self,
        heartbeats: Heartbeats,
        leases: Leases,
        liveness: Liveness,
        watchdog: LeaseWatchdog,
        act_on: Callable[[Lease, bool], None],
        failover: bool,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = leases.host
        self.heartbeats = heartbeats
        self.leases = leases
        self.liveness = liveness
        self.watchdog = watchdog
        self.act_on = act_on
        self.failover = failover
        self.monotonic = monotonic
        self.sweeper = LeaseSweep(leases.store, leases)
        self._dead: dict[str, _Dead] = {}

    @property
    def unowned(self) -> int:
        """Workloads still held by hosts found dead (no host took them over yet)."""
        return sum(len(d.names) for d in self._dead.values())

    def holder_dead(self, host: str) -> bool:
        """Whether `host` was found dead and its heartbeat is still the version found dead
        (read now): asked by a takeover after it read the lease (storage/leases.py)."""
        judged = self.liveness.dead(host)
        if judged is None:
            return False
        try:
            now = self.heartbeats.version_of(host)
        except StorageError as e:
            log.warning("fleet: cannot read the heartbeat of host %s again: %s", host, e)
            return False
        return (now or MISSING) == judged

    # -- every tick ------------------------------------------------------------------------

    def look(self) -> None:
        """One listing of `hosts/`; read the heartbeat of each suspect, and the leases of each
        host found dead; look again at dead hosts' leases not taken yet."""
        started = self.monotonic()
        versions = self.heartbeats.listing()
        returned = self.monotonic()
        for host in self.liveness.observe(versions, started, returned):
            self._suspect(host, started)
        for host in list(self._dead):
            if self.liveness.dead(host) is None:
                log.warning("fleet: host %s is alive again (its heartbeat changed)", host)
                del self._dead[host]
            elif self._dead[host].names and self.monotonic() >= self._dead[host].next_look:
                self._look_at(host)

    def _suspect(self, host: str, started: float) -> None:
        try:
            found = self.heartbeats.read(host, strict=False)
        except StorageError as e:
            log.warning("fleet: cannot read the heartbeat of host %s: %s", host, e)
            return
        beat = found[0] if found else None
        version = found[1] if found else MISSING
        if not self.liveness.confirm(host, version, beat.ttl if beat else None, started):
            return
        names = self.sweeper.cached(host)  # what no heartbeat of it names
        if beat is not None:
            names |= set(beat.workloads) | set(beat.prepared)
        log.warning(
            "fleet: host %s is dead (its heartbeat %s for its TTL + skew); %d of its "
            "workloads to look at%s",
            host,
            "unchanged" if beat is not None or found else "missing",
            len(names),
            "" if self.failover else " (failover is off: not taken over)",
        )
        self._dead[host] = _Dead(names)
        self._look_at(host)

    def _look_at(self, host: str) -> None:
        """Read the leases of a dead host's workloads; offer those it still holds."""
        dead = self._dead[host]
        dead.next_look = self.monotonic() + DEAD_RETRY
        if not self.failover:
            return  # counted as unowned, read by nobody: no host here takes them
        still: set[str] = set()
        for name in sorted(dead.names):
            try:
                held = self.leases.read(name)
            except CorruptCheckpoint:
                continue
            except StorageError as e:
                log.warning("fleet: cannot read the lease of %s: %s", name, e)
                still.add(name)
                continue
            if held is None or held.lease.holder != host:
                continue
            if held.lease.state is not LeaseState.RELEASED:
                still.add(name)
                self.act_on(held.lease, True)
        dead.names = still

    # -- the sweep -------------------------------------------------------------------------

    def sweep(self) -> None:
        """The slow look at every lease (module docstring)."""
        now = self.monotonic()
        found = self.sweeper.run()
        swept = set()
        for lease in found:
            swept.add(lease.workload)
            ours = self.watchdog.held(lease.workload)
            if ours is not None:
                if taken_from(ours.lease, lease):
                    log.error(
                        "fleet: the lease of %s is now %s's (generation %d): ours is lost",
                        lease.workload,
                        lease.holder,
                        lease.generation,
                    )
                    self.watchdog.lose(lease.workload)
                continue
            holder = lease.holder
            if holder != self.host and not self.liveness.listed(holder):
                self.liveness.notice_missing(holder, now)
            dead = (
                holder != self.host
                and lease.state is not LeaseState.RELEASED
                and self.liveness.dead(holder) is not None
            )
            if dead:
                self._dead.setdefault(holder, _Dead()).names.add(lease.workload)
            self.act_on(lease, dead)
        for name in set(self.watchdog.names()) - swept:
            self._gone(name)

    def _gone(self, name: str) -> None:
        """A lease we hold that the sweep did not list: read it (the listing may predate our
        claim); gone, it is lost (deleted by someone who can write the bucket)."""
        try:
            held = self.leases.read(name)
        except StorageError:  # unreadable or replayed too: nobody can take it with that
            return
        ours = self.watchdog.held(name)
        if ours is not None and (held is None or taken_from(ours.lease, held.lease)):
            log.error("fleet: the lease of %s is gone or taken: ours is lost", name)
            self.watchdog.lose(name)
