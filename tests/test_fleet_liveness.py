"""Heartbeat-only liveness (issue 27), driven through `Fleet.step` on a virtual clock: whole
Fleet objects of the daemon's code, several "hosts" in one process on one store, no threads.

What is held: a host is found dead only once its heartbeat's version was seen unchanged for
its TTL on the watcher's monotonic clock (never by wall clocks), by then the holder stopped its
copies at least clock_skew before (its deadline); its leases are then
taken over, one winner; a lease whose holder died before any heartbeat named it is found by
the sweep; a holder that comes back fences a watcher still holding its old judgement; and a
host's requests per tick do not grow with another host's workloads."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import pytest

from checkpointer.config import Config
from checkpointer.daemon.fleet import Fleet, FleetHooks
from checkpointer.errors import NotOwner
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.wrapper import WrappedBlobStore
from storage.crypto import Codec, Sealed, new_master
from storage.errors import TransientStorageError
from storage.leases import LeaseHeld, Leases, LeaseState

T = TypeVar("T")
TTL, SKEW, RENEW = 6.0, 1.0, 1.0


class Counted(WrappedBlobStore):
    """Counts requests by kind and by top-level prefix ("get leases/", "list hosts/")."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.ops: Counter[str] = Counter()
        self._key = ""

    def around(self, op: str, fn: Callable[[], T]) -> T:
        self.ops[f"{op} {self._key}"] += 1
        return fn()

    def _at(self, key: str) -> Counted:
        self._key = key.split("/", 1)[0] + "/" if "/" in key else key
        return self

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        return self._at(key).around("get", lambda: self.inner.get_versioned(key, limit))

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        return self._at(key).around("put", lambda: self.inner.put_if(key, data, match))

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        return iter(self._at(prefix).around("list", lambda: list(self.inner.list_versions(prefix))))


@dataclass
class Clock:
    now: float = 0.0
    wall_offset: float = 1_800_000_000.0

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_offset + self.now


@dataclass
class Engine:
    """The engine as the fleet sees it: offers recorded, and taken at once if `takes`."""

    fleet: Fleet | None = None
    takes: bool = True
    offered: list[tuple[str, str]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    taken_at: dict[str, float] = field(default_factory=dict)  # monotonic

    def on_offered(self, name: str, reason: str) -> None:
        self.offered.append((name, reason))
        if self.takes and self.fleet is not None:
            try:
                self.fleet.claim(name)
            except NotOwner:
                return
            self.taken.append(name)
            self.taken_at[name] = self.fleet.monotonic()

    def hooks(self) -> FleetHooks:
        return FleetHooks(
            lost=lambda name, holder: self.lost.append(name),
            offered=self.on_offered,
            known=lambda: [],
            prefetch=lambda name: None,
        )


def host(
    tmp_path: Path,
    store: BlobStore,
    codec: Codec,
    name: str,
    clock: Clock,
    wall: Callable[[], float] | None = None,
    ttl: float = TTL,
    failover: bool = True,
) -> tuple[Fleet, Engine]:
    state = tmp_path / f"state-{name}"
    state.mkdir(exist_ok=True)
    config = Config.model_validate(
        {
            "state_dir": str(state),
            "host": {"id": name},
            "fleet": {
                "enabled": True,
                "failover": failover,
                "lease_ttl": ttl,
                "renew_every": RENEW,
                "clock_skew": SKEW,
            },
        }
    )
    fleet = Fleet(config, store, codec, clock=wall or clock.wall, monotonic=clock.mono)
    engine = Engine(fleet)
    fleet.start(engine.hooks(), threads=False)
    return fleet, engine


Pair = tuple[Clock, Fleet, Engine, Fleet, Engine]


def two_hosts(tmp_path: Path, bucket: tuple[Counted, Codec]) -> Pair:
    """Hosts a and b on one bucket and one virtual clock, a holding "web"."""
    store, codec = bucket
    clock = Clock()
    a, a_engine = host(tmp_path, store, codec, "a", clock)
    b, b_engine = host(tmp_path, store, codec, "b", clock)
    a.claim("web")
    return clock, a, a_engine, b, b_engine


def run(clock: Clock, fleets: list[Fleet], seconds: float, tick: float = 0.25) -> None:
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now = round(clock.now + tick, 6)
        for f in fleets:
            f.step()


def run_as_asked(clock: Clock, fleets: list[Fleet], until: Callable[[], bool]) -> None:
    """Step each fleet when its last step asked to be stepped again (as the daemon's scan
    loop and a simulation do), until `until()`."""
    due = {id(f): clock.now for f in fleets}
    while not until():
        f = min(fleets, key=lambda f: due[id(f)])
        clock.now = max(clock.now, due[id(f)])
        due[id(f)] = f.step()
        assert clock.now < 1000, "never"


@pytest.fixture
def bucket(tmp_path: Path) -> tuple[Counted, Codec]:
    return Counted(LocalBlobStore(tmp_path / "bucket")), Sealed(new_master())


def test_a_dead_host_is_found_after_ttl_of_an_unchanged_heartbeat_not_by_wall_clocks(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    store, codec = bucket
    clock = Clock()
    # A's wall clock is an hour behind: by wall clocks its heartbeat is always stale.
    a, _ = host(tmp_path, store, codec, "a", clock, wall=lambda: clock.wall() - 3600)
    b, b_engine = host(tmp_path, store, codec, "b", clock)
    assert a.claim("web") == 1 and a.watchdog.acting("web")
    run(clock, [a, b], 60)  # a minute of heartbeats: never dead, never offered
    assert b.liveness.dead("a") is None and b_engine.offered == []
    stopped = clock.now  # A stops (its daemon and machine die): no more heartbeats
    deadline = a.watchdog._deadline  # A stops its copies then: last heartbeat's send + TTL - skew
    while b.liveness.dead("a") is None:
        run(clock, [b], 0.25)
        assert clock.now - stopped < TTL + 3 * RENEW
    waited = clock.now - stopped
    # Unchanged for TTL counted from the listing that first showed A's last version (at most
    # one scan after it was written) to the start of the one that judged it.
    assert TTL <= waited <= TTL + RENEW + 0.5, waited
    # The margin the safety argument keeps (storage/heartbeats.py): A's copies were stopped at
    # least clock_skew before B judged it dead, and B's takeover came after that.
    assert clock.now - deadline >= SKEW
    assert b_engine.offered == [("web", "failover")] and b_engine.taken == ["web"]
    held = b.leases.read("web")
    assert held is not None and held.lease.holder == "b" and held.lease.generation == 2
    assert held.lease.previous_holder == "a"


def test_a_dead_host_is_judged_when_due_not_at_the_next_tick(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """Each round says when the next is wanted: B looks again the moment A's heartbeat has
    been unchanged for TTL, not up to a scan period later."""
    store, codec = bucket
    clock = Clock(now=0.1)
    ttl = 6.4  # TTL is no whole number of ticks
    a, _ = host(tmp_path, store, codec, "a", clock, ttl=ttl)
    clock.now = 0.6  # B's ticks fall half a tick after A's
    b, b_engine = host(tmp_path, store, codec, "b", clock, ttl=ttl)
    a.claim("web")
    run_as_asked(clock, [a, b], lambda: clock.now > 30)
    run_as_asked(clock, [b], lambda: b.liveness.dead("a") is not None)
    first_seen = b.liveness._seen["a"][1]  # the listing that first showed A's last heartbeat
    assert clock.now == pytest.approx(first_seen + ttl)
    assert b_engine.taken == ["web"]


def test_a_longer_ttl_in_the_heartbeat_is_waited_for(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    store, codec = bucket
    clock = Clock()
    a, _ = host(tmp_path, store, codec, "a", clock, ttl=20.0)
    b, b_engine = host(tmp_path, store, codec, "b", clock)
    a.claim("web")
    run(clock, [a, b], 3)
    stopped = clock.now
    run(clock, [b], TTL + 2)  # past B's own TTL: A is only suspected
    assert b.liveness.dead("a") is None and b_engine.offered == []
    run(clock, [b], 20 - (clock.now - stopped) + 1.5)
    assert b.liveness.dead("a") is not None and b_engine.taken == ["web"]


def test_the_holder_stops_at_ttl_minus_skew_after_its_last_heartbeat_was_sent(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """The deadline counts from when the heartbeat was *sent*: a write that takes 2 s to come
    back moves the deadline to its send time + TTL - skew, not its reply's."""
    store, codec = bucket
    clock = Clock()
    a, _ = host(tmp_path, store, codec, "a", clock)
    a.claim("web")
    slow = store.put_if

    def put_if(key: str, data: bytes | memoryview, match: str | None) -> str:
        clock.now += 2.0 if key.startswith("hosts/") else 0.0
        return slow(key, data, match)

    store.put_if = put_if  # type: ignore[method-assign]
    sent = clock.now
    a.watchdog.beat()
    assert a.watchdog.acting("web")
    assert a.watchdog._deadline == pytest.approx(sent + TTL - SKEW)
    store.put_if = slow  # type: ignore[method-assign]


def test_an_orphan_lease_whose_holder_died_before_naming_it_is_found_by_the_sweep(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    store, codec = bucket
    clock = Clock()
    a, _ = host(tmp_path, store, codec, "a", clock)
    b, b_engine = host(tmp_path, store, codec, "b", clock)
    b.sweep_every = 30.0
    a.leases.acquire("orphan")  # A writes the lease and dies before a heartbeat names it
    Leases(store, codec, "ghost").acquire("haunted")  # a holder with no heartbeat at all
    run(clock, [b], TTL + SKEW + 3)
    assert b.liveness.dead("a") is not None  # found dead; its heartbeat named nothing
    assert b_engine.offered == []
    run(clock, [b], 30)  # the sweep: both leases, their holders dead or missing
    assert ("orphan", "failover") in b_engine.offered
    run(clock, [b], TTL + SKEW + RENEW + 1)  # the ghost: dead TTL + skew after noticed
    assert sorted(b_engine.taken) == ["haunted", "orphan"], b_engine.offered


def test_a_holder_back_after_its_deadline_fences_a_watcher_with_an_old_judgement(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """B found A dead, then A's daemon ran again and claimed its workload anew (heartbeat
    first, then the lease written again): B's takeover, which read the heartbeat before A
    came back, is refused, and A keeps the lease."""
    clock, a, _, b, b_engine = two_hosts(tmp_path, bucket)
    b_engine.takes = False  # B's engine is slow to act on the offer
    run(clock, [a, b], 2)
    run(clock, [b], TTL + SKEW + 2)
    assert b.liveness.dead("a") is not None and b_engine.offered == [("web", "failover")]
    assert not a.watchdog.live()
    run(clock, [a], 0.25)  # A runs again: a late heartbeat, then its lease written again
    assert a.watchdog.acting("web")
    with pytest.raises(LeaseHeld):  # the heartbeat B judged is no longer there
        b.leases.acquire("web")
    held = a.leases.read("web")
    assert held is not None and held.lease.holder == "a" and held.lease.generation == 1


def test_a_lease_taken_while_the_holder_was_away_is_lost_not_thawed(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    clock, a, a_engine, b, b_engine = two_hosts(tmp_path, bucket)
    run(clock, [a, b], 2)
    run(clock, [b], TTL + SKEW + 2)
    assert b_engine.taken == ["web"]
    run(clock, [a, b], 1)  # A runs again: its late heartbeat, its lease written again: taken
    assert a_engine.lost == ["web"] and not a.holds("web")
    held = b.leases.read("web")
    assert held is not None and held.lease.holder == "b" and held.lease.state is LeaseState.HELD


def test_the_sweep_finds_a_lease_of_ours_taken_and_loses_it(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """Nothing per tick reads our own leases: a lease taken behind this host's back (a
    bucket writer, a host that wrongly judged it dead) is found by the sweep, not missed."""
    clock, a, a_engine, _, _ = two_hosts(tmp_path, bucket)
    a.sweep_every = 30.0
    current = a.leases.read("web")
    assert current is not None and a.watchdog.acting("web")
    taken = replace(current.lease, holder="b", generation=2)
    bucket[0].put_if("leases/web", bucket[1].seal("leases/web", taken.to_json()), current.version)
    run(clock, [a], 20)
    assert a_engine.lost == [] and a.holds("web")  # per tick, nothing looks
    run(clock, [a], 11)
    assert a_engine.lost == ["web"] and not a.holds("web")


def test_requests_per_tick_do_not_grow_with_another_hosts_workloads(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """A's requests over 20 ticks (each through its own counting store) with B holding no
    workload, then 500: one listing of hosts/ and one heartbeat a tick, both times."""
    seen_by_b, codec = bucket
    seen_by_a = Counted(seen_by_b.inner)
    clock = Clock()
    a, _ = host(tmp_path, seen_by_a, codec, "a", clock)
    b, _ = host(tmp_path, seen_by_b, codec, "b", clock)
    run(clock, [a, b], 5)

    def a_ticks(n: int) -> Counter[str]:
        before = Counter(seen_by_a.ops)
        run(clock, [a, b], n * RENEW, tick=RENEW)
        return seen_by_a.ops - before

    idle = a_ticks(20)
    for i in range(500):
        b.claim(f"w{i}")
    busy = a_ticks(20)
    assert idle == busy == Counter({"list hosts/": 20, "put hosts/": 20}), (idle, busy)
    assert len(b.watchdog.names()) == 500


class Partitioned(WrappedBlobStore):
    """One host's view of the bucket: its heartbeat writes fail while `down`."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.down = False

    def around(self, op: str, fn: Callable[[], T]) -> T:
        return fn()

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        if self.down and key.startswith("hosts/"):
            raise TransientStorageError("partitioned (test)")
        return self.inner.put_if(key, data, match)


class Stalled(WrappedBlobStore):
    """A watcher's view of the bucket: its next GET of `key` runs `stall()` first (the
    daemon paused, or the request retried under throttling, between listing and GET)."""

    def __init__(self, inner: BlobStore, key: str, stall: Callable[[], None]) -> None:
        super().__init__(inner)
        self.key, self.stall, self.armed = key, stall, False

    def around(self, op: str, fn: Callable[[], T]) -> T:
        return fn()

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        if self.armed and key == self.key:
            self.armed = False
            self.stall()
        return self.inner.get_versioned(key, limit)


def test_a_heartbeat_landing_while_a_suspects_get_stalls_counts_from_the_gets_return(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """The reviewer's interleaving, scaled to TTL 6 and skew 1: A's heartbeats fail, so B's
    listing makes A a suspect; B's GET of A's heartbeat stalls 3 s (more than skew), and
    meanwhile one heartbeat of A lands (A's deadline moves to its send + TTL - skew); then A
    is partitioned again. B must count that version from its GET's return, not from the
    listing before it: else it judges A dead, and takes its lease, while A's copies still run
    (taken at 17.0 s, A's copies running until 17.5 s, before the fix)."""
    store, codec = bucket
    clock = Clock()
    a_view = Partitioned(store)
    a, _ = host(tmp_path, a_view, codec, "a", clock)
    sent: list[float] = []

    def stall() -> None:  # B's GET waits 3 s; A's heartbeat gets through in the middle
        run(clock, [a], 1.5)
        a_view.down = False
        sent.append(clock.now)
        a.watchdog.beat()
        a_view.down = True
        run(clock, [a], 1.5)

    b_view = Stalled(store, "hosts/a", stall)
    b, b_engine = host(tmp_path, b_view, codec, "b", clock)
    a.claim("web")
    run(clock, [a, b], 5)
    a_view.down = True  # A's heartbeats fail from now on: B suspects it TTL later
    b_view.armed = True
    while not b_engine.taken:
        run(clock, [a, b], 0.25)
        assert clock.now < 60, "never taken over"
    assert sent and b.leases.read("web") is not None  # the stall happened, A's beat landed
    deadline = a.watchdog._deadline  # A stops its copies then: the landed beat's send + 5
    assert deadline == pytest.approx(sent[0] + TTL - SKEW)
    taken = b_engine.taken_at["web"]
    assert taken - deadline >= SKEW, f"taken over at {taken}, A's copies ran until {deadline}"
