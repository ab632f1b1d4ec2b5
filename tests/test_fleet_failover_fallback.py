"""Failover past the first ranked hosts (issue 27), on a virtual clock like
tests/test_fleet_liveness.py: a dead host's lease, or an orphan lease, that its first
FALLBACKS + 1 ranked hosts do not take (they refuse it, or died too) is still offered to the
next eligible host and taken, by the sweep of `leases/`. The sweep reads a lease it skipped
(not its turn at its first sweep) once it becomes its turn (fleet_sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpointer.daemon.fleet import Fleet
from checkpointer.daemon.fleet_rank import order
from checkpointer.daemon.fleet_scan import ESCALATE_EVERY, FALLBACKS
from storage.backends import LocalBlobStore
from storage.crypto import Sealed, new_master
from tests.test_fleet_liveness import TTL, Clock, Counted, Engine, host, run

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

SWEEP = 20.0  # seconds between sweeps here (10 min in production)
HOSTS = "abcdef"


def six_hosts(tmp_path: Path) -> tuple[Clock, dict[str, Fleet], dict[str, Engine]]:
    """Hosts a to f on one bucket and one virtual clock, each sweeping every SWEEP s."""
    store, codec = Counted(LocalBlobStore(tmp_path / "bucket")), Sealed(new_master())
    clock = Clock()
    pairs = {h: host(tmp_path, store, codec, h, clock) for h in HOSTS}
    for fleet, _ in pairs.values():
        fleet.sweep_every = SWEEP
    return clock, {h: f for h, (f, _) in pairs.items()}, {h: e for h, (_, e) in pairs.items()}


def test_a_dead_hosts_workload_its_first_ranked_refuse_goes_to_the_next(
    tmp_path: Path,
) -> None:
    """A holds 40 workloads; every host's first sweep has run (each read only the leases it
    is among the first FALLBACKS + 1 to take over). The first three ranked hosts of w00
    refuse it (a CPU it does not fit, say), then A dies: the fourth or fifth takes it at its
    next sweep (whichever sweeps first). Before, nobody else was ever offered it (the
    refusers 14 times each in 220 s)."""
    clock, fleets, engines = six_hosts(tmp_path)
    names = [f"w{i:02d}" for i in range(40)]
    for name in names:
        fleets["a"].claim(name)
    run(clock, list(fleets.values()), SWEEP + 5)  # every host's first sweep
    ranked = order(names[0], HOSTS[1:])
    for h in ranked[: FALLBACKS + 1]:
        engines[h].takes = False
    stopped = clock.now
    run(clock, [fleets[h] for h in HOSTS[1:]], TTL + 4 * SWEEP)  # A dies
    takers = [h for h in ranked[FALLBACKS + 1 :] if names[0] in engines[h].taken]
    assert len(takers) == 1, {h: engines[h].offered.count((names[0], "failover")) for h in ranked}
    # after the ranked turns, at the willing ones' first sweep past them
    assert engines[takers[0]].taken_at[names[0]] - stopped <= TTL + 2 + 2 * SWEEP
    taken = sorted(n for h in HOSTS[1:] for n in engines[h].taken)
    assert taken == names  # every workload, once


def test_a_dead_hosts_workload_whose_first_ranked_died_just_after_goes_to_the_next(
    tmp_path: Path,
) -> None:
    """A dies, and the first three ranked hosts of w00 die 2 s before A is judged dead: their
    heartbeats still look fresh then, so they are ranked (and are not there to take it).
    The fourth or fifth takes it at its next sweep; before, nobody did."""
    clock, fleets, engines = six_hosts(tmp_path)
    names = [f"w{i:02d}" for i in range(40)]
    for name in names:
        fleets["a"].claim(name)
    run(clock, list(fleets.values()), SWEEP + 5)
    ranked = order(names[0], HOSTS[1:])
    living = [fleets[h] for h in HOSTS[1:]]
    run(clock, living, TTL - 2)  # A stops; its first three of w00 2 s before it is judged
    living = [fleets[h] for h in ranked[FALLBACKS + 1 :]]
    run(clock, living, TTL + 4 * SWEEP)  # and so do the first three of w00
    taken = [n for h in ranked[FALLBACKS + 1 :] for n in engines[h].taken]
    assert names[0] in taken and len(taken) == len(set(taken))


def test_an_orphan_lease_its_first_ranked_refuse_reaches_the_next_in_the_end(
    tmp_path: Path,
) -> None:
    """A writes a lease and dies before any heartbeat names it (nobody's heartbeat tells who
    holds it: only the sweep finds it). Its first three ranked hosts refuse it; a lease
    unread here is read by one more rank every ESCALATE_EVERY, so the fourth reads it and
    takes it about ESCALATE_EVERY after its first listing (before: never), the fifth is
    not offered it."""
    clock, fleets, engines = six_hosts(tmp_path)
    run(clock, list(fleets.values()), 2)
    fleets["a"].leases.acquire("orphan")
    ranked = order("orphan", HOSTS[1:])
    for h in ranked[: FALLBACKS + 1]:
        engines[h].takes = False
    rest = [fleets[h] for h in HOSTS[1:]]
    run(clock, rest, SWEEP + 5)  # A is dead; the first sweeps
    assert not any(engines[h].taken for h in HOSTS[1:])
    run(clock, rest, ESCALATE_EVERY - SWEEP, tick=2.5)
    fourth, fifth = ranked[FALLBACKS + 1 :]
    assert engines[fourth].offered == [] and engines[fifth].offered == []
    run(clock, rest, 3 * SWEEP, tick=2.5)
    assert engines[fourth].taken == ["orphan"] and engines[fifth].offered == []
