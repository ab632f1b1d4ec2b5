"""Failover at scale (issue 27), driven through `Fleet.step` on a virtual clock like
tests/test_fleet_liveness.py: a dead host's workloads go to their rendezvous first choice
(fleet_rank.py) at the judgement, a refusing, dead or ineligible first choice costs one scan
period at most, and the sweep of `leases/` neither holds up the listing of `hosts/` nor has
every host read every lease."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpointer.daemon.fleet import Fleet
from checkpointer.daemon.fleet_rank import order, within
from checkpointer.daemon.fleet_scan import FALLBACKS
from storage.backends import LocalBlobStore
from storage.crypto import Codec, Sealed, new_master
from tests.test_fleet_liveness import RENEW, TTL, Clock, Counted, Engine, host, run

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


@pytest.fixture
def bucket(tmp_path: Path) -> tuple[Counted, Codec]:
    return Counted(LocalBlobStore(tmp_path / "bucket")), Sealed(new_master())


def a_holding_12_and_three_watchers(
    tmp_path: Path, bucket: tuple[Counted, Codec], b_fails_over: bool = True
) -> tuple[Clock, list[Fleet], list[Engine], list[str]]:
    """Hosts a, b, c, d; a holds 12 workloads; 5 s of heartbeats."""
    store, codec = bucket
    clock = Clock()
    pairs = [
        host(tmp_path, store, codec, h, clock, failover=b_fails_over or h != "b") for h in "abcd"
    ]
    fleets = [f for f, _ in pairs]
    names = [f"w{i:02d}" for i in range(12)]
    for name in names:
        fleets[0].claim(name)
    run(clock, fleets, 5)
    return clock, fleets, [e for _, e in pairs], names


def test_a_dead_hosts_workloads_go_to_their_first_choice_and_a_refusing_one_costs_a_scan(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """A holds 12 workloads and dies. Each is taken over by the first host of its rendezvous
    order at the judgement, one takeover each (no race of every watcher for every lease);
    B refuses every takeover (a CPU the checkpoints do not fit, say), so those first B's are
    taken by the next in their order, one scan period later, not lost."""
    clock, (_, b, c, d), (_, b_engine, c_engine, d_engine), names = a_holding_12_and_three_watchers(
        tmp_path, bucket
    )
    b_engine.takes = False
    run(clock, [b, c, d], TTL + 4 * RENEW)  # A stops; found dead; the fallbacks' turns pass
    judged = min(c_engine.taken_at.values())
    engines = {"b": b_engine, "c": c_engine, "d": d_engine}
    first_b = [n for n in names if order(n, engines)[0] == "b"]
    assert 0 < len(first_b) < len(names)  # the case is there (the names are chosen for it)
    assert sorted(b_engine.offered) == [(n, "failover") for n in first_b]
    for name in names:
        taker = next(h for h in order(name, engines) if h != "b" or name not in first_b)
        assert engines[taker].offered.count((name, "failover")) == 1
        assert name in engines[taker].taken
        delay = engines[taker].taken_at[name] - judged
        assert delay == pytest.approx(RENEW if name in first_b else 0.0, abs=0.3), name
    assert sorted(c_engine.taken + d_engine.taken) == names  # each once


def test_a_first_choice_that_died_too_costs_its_workloads_one_scan(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """B dies just before A is judged dead (its heartbeat still looks fresh to C and D): the
    workloads ranked first to B wait one scan period, then the next in line takes them."""
    clock, (_, b, c, d), (_, _, c_engine, d_engine), names = a_holding_12_and_three_watchers(
        tmp_path, bucket
    )
    run(clock, [b, c, d], TTL - 0.5)  # A stops; B a moment before A is found dead
    run(clock, [c, d], 4 * RENEW)
    engines = {"c": c_engine, "d": d_engine}
    assert any(order(n, ["b", "c", "d"])[0] == "b" for n in names)  # the case is there
    judged = min(min(e.taken_at.values()) for e in engines.values())
    assert sorted(c_engine.taken + d_engine.taken) == names
    for name in names:
        ranked = order(name, ["b", "c", "d"])
        taker = ranked[1] if ranked[0] == "b" else ranked[0]
        delay = engines[taker].taken_at[name] - judged
        assert delay == pytest.approx(RENEW if ranked[0] == "b" else 0.0, abs=0.3), name


def test_a_host_with_failover_off_is_not_ranked_so_costs_no_scan(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """B has fleet.failover off, and says so in its heartbeat; C and D read it (one heartbeat
    a scan) and rank only each other: every workload of A is taken at the judgement."""
    clock, (_, b, c, d), (_, b_engine, c_engine, d_engine), names = a_holding_12_and_three_watchers(
        tmp_path, bucket, b_fails_over=False
    )
    assert any(order(n, ["b", "c", "d"])[0] == "b" for n in names)  # the case is there
    run(clock, [b, c, d], TTL + 4 * RENEW)
    engines = {"c": c_engine, "d": d_engine}
    judged = min(min(e.taken_at.values()) for e in engines.values())
    assert b_engine.offered == [] and sorted(c_engine.taken + d_engine.taken) == names
    for name in names:
        taker = order(name, engines)[0]
        assert engines[taker].taken_at[name] == pytest.approx(judged, abs=0.3), name


def test_a_long_sweep_does_not_hold_up_finding_a_dead_host(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """B's first sweep has 300 leases to read, 0.1 s each (30 s at once, on the scan's thread,
    before: no listing of hosts/ all that time). A dies as it begins: B reads a share of the
    sweep each scan and still finds A dead within TTL + a scan of its last heartbeat."""
    store, codec = bucket
    clock = Clock()
    a, _ = host(tmp_path, store, codec, "a", clock)
    b, b_engine = host(tmp_path, store, codec, "b", clock)
    b_engine.takes = False  # its takeovers would read and write 300 leases more
    for i in range(300):
        a.claim(f"w{i:03d}")
    b.sweep_every = 10.0
    run(clock, [a, b], 9.5)
    stopped = clock.now  # A dies; B's sweep begins at 10 s
    fast = store.get_versioned

    def get_versioned(key: str, limit: int | None = None) -> tuple[bytes, str]:
        clock.now += 0.1 if key.startswith("leases/") else 0.0
        return fast(key, limit)

    store.get_versioned = get_versioned  # type: ignore[method-assign]
    while b.liveness.dead("a") is None:
        run(clock, [b], 0.25)
        assert clock.now - stopped < 100, "never"
    judged = b.watcher._dead["a"].judged  # then it read A's 300 leases (0.1 s each)
    assert judged - stopped < TTL + 3 * RENEW
    assert 0 < b.watcher.sweeper.pending < 300  # the sweep goes on, a share a scan
    store.get_versioned = fast  # type: ignore[method-assign]


def test_a_hosts_first_sweep_reads_only_the_leases_it_would_take_over(
    tmp_path: Path, bucket: tuple[Counted, Codec]
) -> None:
    """Six hosts, A holding 60 workloads: B's first sweep reads the leases of the workloads it
    is among the first FALLBACKS + 1 to take over, not all 60 (every host reading every
    lease once was H x N GETs: 1,000,000 at 100 hosts x 10,000 workloads); a lease that
    changes is read by every host's next sweep."""
    store, codec = bucket
    clock = Clock()
    fleets = [host(tmp_path, store, codec, h, clock)[0] for h in "abcdef"]
    a, b = fleets[0], fleets[1]
    names = [f"w{i:02d}" for i in range(60)]
    for name in names:
        a.claim(name)
    b.sweep_every = 10.0
    run(clock, fleets, 9.5)
    before = store.ops["get leases/"]
    run(clock, fleets, 1.0)  # B's sweep (the others' are 10 min away)
    mine = [n for n in names if within(n, "b", "acdef", FALLBACKS)]
    assert 0 < len(mine) < len(names)
    assert store.ops["get leases/"] - before == len(mine)
    assert set(b.watcher.sweeper._cache) == set(mine)
    a.release(names[0])  # changed: B's next sweep reads it, whoever's turn it would be
    before = store.ops["get leases/"]
    run(clock, fleets, 10.0)
    assert store.ops["get leases/"] - before == 1
