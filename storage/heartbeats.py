"""Heartbeats: each host's liveness, one object per host, and the other hosts' judgement of it.

`hosts/<host id>` is written by its host every `fleet.renew_every` with `put_if`, sealed like
every object. It says which workloads the host holds (with their lease generations: the
watchers' index of what to look at when the host dies, bounded by the host's own workloads),
what it fetched ahead of hand-overs (`prepared`), whether it is draining, its TTL and a serial.
A workload's lease (storage/leases.py) names its holder and changes only on claim, prepare,
hand-over, release and takeover; it is live while its holder's heartbeat is.

Watchers judge liveness as the DynamoDB lock client judges a lease: from one listing of
`hosts/` per scan (`fleet.scan_every`), with each object's version (`BlobStore.list_versions`,
no GET), a host is dead once its heartbeat's version has been seen unchanged for the host's TTL
on the watcher's own monotonic clock (`Liveness`), counted from the end of the listing that
first showed that version (or from the return of the GET that first showed it: a suspect's
heartbeat read anew, `Liveness.confirm`) to the start of the one that shows it still. Never by
comparing clocks.

Why TTL is enough, and what margin remains. The holder stops every copy at t0 + TTL - skew on
its own monotonic clock (CLOCK_BOOTTIME, which goes on counting through a suspend of the
machine), t0 being the send time of its last heartbeat that landed
(checkpointer/daemon/lease_watchdog.py). The version that heartbeat wrote cannot be in a
listing before t0, so the watcher's first sighting f (the end of that listing) is >= t0, and
it judges the host dead no earlier than f + TTL >= t0 + TTL: the copies were stopped at least
`clock_skew` (5 s by default) before any watcher may take a lease, and the new owner's restore
starts later still (after its lease write, If-Match). A later heartbeat whose reply was lost
only moves f later (its version is newer, the deadline is not). The rule that keeps f >= t0:
a first sighting is recorded at a moment this watcher had already received the version (the
return of the request that showed it), never at a time taken before that request was sent. A
suspect's GET that returns a newer version counts it from the GET's return, not from the start
of the listing that made it a suspect: the GET may come any time later (a paused daemon, the
listing and the GET retried under throttling), and the holder may have sent that version in
between, so the listing's start can be before t0, and a judgement from it would come while
the holder's copies still run (the margin was 2 x skew when this was first wrong, and is skew
now: any gap over skew between the listing and the GET broke it). That margin of >= skew covers
what is not instant on the holder's side: the watchdog thread waking late for the deadline
(scheduling, a loaded machine; the deadman stops the trees at the same deadline if the whole
daemon is paused), the SIGSTOP of each tree, and the two monotonic clocks' rates (ppm over a
TTL). It covers no wall-clock difference because none is compared. (Before, watchers waited
TTL + skew, a margin of 2 x skew that bought nothing more and cost skew seconds of every
failover.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobNotFound, CorruptCheckpoint, PreconditionFailed
from storage.keys import HOSTS, FileType, host_key, parse_as
from storage.manifest import check_workload_name

# A heartbeat lists its host's workloads (~25 bytes each): 1 MiB holds ~40,000 of them.
MAX_HEARTBEAT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Heartbeat:
    """What a host says of itself."""

    host: str
    serial: int  # one more at each write of this host (a restart goes on from the bucket's)
    seen: float  # the host's wall clock when it wrote it: for people, never compared
    ttl: float  # the host's lease TTL: watchers wait at least this
    workloads: dict[str, int] = field(default_factory=dict)  # held: workload -> generation
    prepared: dict[str, str] = field(default_factory=dict)  # fetched ahead: workload -> id
    draining: bool = False
    failover: bool = True  # whether the host takes over dead hosts' workloads (fleet.failover)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": 2,
                "host": self.host,
                "serial": self.serial,
                "seen": self.seen,
                "ttl": self.ttl,
                "workloads": self.workloads,
                "prepared": self.prepared,
                "draining": self.draining,
                "failover": self.failover,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, host: str) -> Heartbeat:
        """Strictly: written by whoever can write the bucket. Heartbeats of the previous
        version (no serial, no workloads) read as listing nothing."""
        try:
            d = json.loads(raw)
            workloads = d.get("workloads") or {}
            prepared = d.get("prepared") or {}
            if not isinstance(workloads, dict) or not isinstance(prepared, dict):
                raise TypeError("workloads and prepared must be objects")
            beat = cls(
                host=str(d["host"]),
                serial=int(d.get("serial", 0)),
                seen=float(d["seen"]),
                ttl=float(d["ttl"]),
                workloads={check_workload_name(str(k)): int(v) for k, v in workloads.items()},
                prepared={check_workload_name(str(k)): str(v) for k, v in prepared.items()},
                draining=d.get("draining") is True,
                failover=d.get("failover") is not False,  # said by every heartbeat since
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptCheckpoint(f"the heartbeat of host {host} is unreadable ({e})") from e
        if beat.host != host:
            raise CorruptCheckpoint(f"the heartbeat of host {host} names host {beat.host}")
        if not beat.ttl > 0:
            raise CorruptCheckpoint(f"the heartbeat of host {host} says TTL {beat.ttl}")
        return beat


class Heartbeats:
    """The `hosts/` objects of one repository, through its codec."""

    def __init__(
        self,
        store: BlobStore,
        codec: Codec,
        host: str,
        ttl: float,
        clock: Callable[[], float] = time.time,
        failover: bool = True,
    ) -> None:
        self.store = store
        self.failover = failover
        self.codec = codec
        self.host = host
        self.ttl = ttl
        self.clock = clock
        self.serial = 0
        self.version: str | None = None  # of our own heartbeat, as last written or read
        self._lock = threading.Lock()  # one write at a time: each replaces the last

    def write(self, workloads: dict[str, int], prepared: dict[str, str], draining: bool) -> str:
        """Write this host's heartbeat; returns its new version. The first write of a
        process reads the one in the bucket (its version, and its serial to go on from).
        A write of ours whose reply was lost, or one planted, leaves another version there:
        written again over it (nobody else writes this host's heartbeat honestly)."""
        key = host_key(self.host)
        with self._lock:
            if self.version is None:
                found = self.read(self.host, strict=False)
                if found is not None:
                    beat, self.version = found
                    self.serial = max(self.serial, beat.serial if beat else 0)
            self.serial += 1
            doc = Heartbeat(
                self.host,
                self.serial,
                self.clock(),
                self.ttl,
                workloads,
                prepared,
                draining,
                self.failover,
            )
            sealed = self.codec.seal(key, doc.to_json())
            try:
                self.version = self.store.put_if(key, sealed, self.version)
            except PreconditionFailed:
                try:
                    _, current = self.store.get_versioned(key, MAX_HEARTBEAT_BYTES)
                except BlobNotFound:
                    current = None
                self.version = self.store.put_if(key, sealed, current)
            return self.version

    def read(self, host: str, strict: bool = True) -> tuple[Heartbeat | None, str] | None:
        """(the heartbeat, its version), None if there is none. An unreadable one raises
        CorruptCheckpoint, or with `strict` False reads as (None, version): its version
        still counts for liveness."""
        key = host_key(host)
        try:
            blob, version = self.store.get_versioned(key, MAX_HEARTBEAT_BYTES)
        except BlobNotFound:
            return None
        try:
            return Heartbeat.from_json(self.codec.open(key, blob), host), version
        except CorruptCheckpoint:
            if strict:
                raise
            return None, version

    def version_of(self, host: str) -> str | None:
        """The version of `host`'s heartbeat now (None: there is none)."""
        key = host_key(host)
        try:
            return self.store.get_versioned(key, MAX_HEARTBEAT_BYTES)[1]
        except BlobNotFound:
            return None

    def listing(self) -> dict[str, str]:
        """Host id -> the version of its heartbeat: one listing of `hosts/`, no GET."""
        out: dict[str, str] = {}
        for key, version in self.store.list_versions(HOSTS):
            name = parse_as(key, FileType.HOST)
            if name is not None:
                out[name.id] = version
        return out

    def live(self, skew: float) -> dict[str, Heartbeat]:
        """The hosts whose heartbeat was written within its TTL + skew by this host's wall
        clock, read now (one listing, a GET each): for `hosts`, `migrate` and `drain`, which
        ask on demand; never what a takeover is decided by."""
        now = self.clock()
        out: dict[str, Heartbeat] = {}
        for host in sorted(self.listing()):
            try:
                found = self.read(host)
            except CorruptCheckpoint:
                continue
            if found is not None and found[0] is not None:
                beat = found[0]
                if now <= beat.seen + beat.ttl + skew:
                    out[host] = beat
        return out


MISSING = ""  # the "version" of a heartbeat that is not there


class Liveness:
    """Which other hosts are dead, judged from listings of `hosts/` on this host's monotonic
    clock: a heartbeat version seen unchanged for TTL (the host's TTL once read, at least
    ours; the module's docstring says why not TTL + skew), or a heartbeat that is not there,
    noticed that long ago.

    `observe` takes each listing and returns the hosts now *suspected* (unchanged for our own
    TTL); the caller reads each suspect's heartbeat once and hands it to `confirm`,
    which judges it dead, or not yet (its TTL is longer), or alive (it changed meanwhile).
    A dead host stays dead until a listing shows another version of its heartbeat."""

    def __init__(self, host: str, ttl: float) -> None:
        self.host = host
        self.ttl = ttl
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # host -> (version, first seen)
        self._ttl: dict[str, float] = {}  # host -> its TTL, read from the version seen
        self._dead: dict[str, str] = {}  # host -> the version judged dead (MISSING: none)

    def _wait(self, host: str) -> float:
        """TTL, not TTL + skew: the holder stopped its copies skew before (module docstring)."""
        return max(self.ttl, self._ttl.get(host, self.ttl))

    def observe(self, versions: dict[str, str], started: float, returned: float) -> list[str]:
        """Take one listing: sent at `started`, returned at `returned` (monotonic). A version
        first shown by it counts from `returned` (it was there by then); "unchanged until
        now" counts only until `started` (the listing may show the store as it was then)."""
        with self._lock:
            for host, version in versions.items():
                if host != self.host:
                    self._note(host, version, returned)
            for host, (version, _) in list(self._seen.items()):
                if host not in versions and version != MISSING:
                    self._note(host, MISSING, returned)  # deleted: missing from now on
            return [
                host
                for host, (version, first) in self._seen.items()
                if host not in self._dead and started >= first + self._wait(host)
            ]

    def notice_missing(self, host: str, now: float) -> None:
        """`host` holds a lease but has never been seen in a listing: missing from `now`."""
        with self._lock:
            if host != self.host and host not in self._seen:
                self._seen[host] = (MISSING, now)

    def _note(self, host: str, version: str, now: float) -> None:
        seen = self._seen.get(host)
        if seen is None or seen[0] != version:
            self._seen[host] = (version, now)
            self._ttl.pop(host, None)
            self._dead.pop(host, None)

    def confirm(
        self, host: str, version: str, ttl: float | None, started: float, read: float
    ) -> bool:
        """A suspect's heartbeat (`version`, MISSING if none; `ttl` from it) as read by a GET
        that returned at `read` (monotonic), after the listing sent at `started` that made it
        a suspect: True if `host` is dead (unchanged for its TTL by `started`). A changed
        version is alive, and first seen at `read`, never at `started`: it may have been
        written after the listing (module docstring, the rule that keeps the margin)."""
        with self._lock:
            seen = self._seen.get(host)
            if seen is None or seen[0] != version:
                self._note(host, version, read)  # it changed: alive, watched anew
                return False
            if ttl is not None:
                self._ttl[host] = ttl
            if started < seen[1] + self._wait(host):
                return False
            self._dead[host] = version
            return True

    def next_due(self) -> float:
        """When the next host not judged yet could be (monotonic; inf: none): a listing
        started then shows whether its heartbeat is still unchanged."""
        with self._lock:
            return min(
                (
                    first + self._wait(h)
                    for h, (_, first) in self._seen.items()
                    if h not in self._dead
                ),
                default=float("inf"),
            )

    def dead(self, host: str) -> str | None:
        """The version `host` was judged dead in (MISSING: no heartbeat), None if alive."""
        with self._lock:
            return self._dead.get(host)

    def dead_hosts(self) -> list[str]:
        with self._lock:
            return sorted(self._dead)

    def fresh(self, now: float, within: float) -> set[str]:
        """The other hosts whose heartbeat version changed within `within` seconds before
        `now` (monotonic): alive as far as a listing can tell, so candidates to take over a
        dead host's workloads (checkpointer/daemon/fleet_rank.py)."""
        with self._lock:
            return {
                h
                for h, (version, first) in self._seen.items()
                if version != MISSING and h not in self._dead and now - first <= within
            }

    def listed(self, host: str) -> bool:
        """Whether `host`'s heartbeat was there at the last listing."""
        with self._lock:
            seen = self._seen.get(host)
        return seen is not None and seen[0] != MISSING
