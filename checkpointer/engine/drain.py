"""`checkpointer drain`: move every workload of this host to the fleet's other hosts before
maintenance, one `migrate` each (checkpointer/engine/migration.py), least-loaded host first.

While it runs the host says `draining: true` in its heartbeat, so that `hosts` shows it and
another host's drain never sends workloads here. A workload that cannot move (its final
dump fails, the target is gone) is thawed by migrate and runs on here; the report says why.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from checkpointer.api import DrainOutcome, DrainReport, HostReport
from checkpointer.engine.parts import Workloads
from checkpointer.engine.workload import WorkloadState
from checkpointer.errors import CheckpointerError, MigrationFailed
from storage import StorageError
from storage.leases import Lease

if TYPE_CHECKING:
    from checkpointer.engine.reports import Reports

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Migrate = Callable[[str, str], object]  # Migration.migrate: the workload, the target host


class DrainingFleet(Protocol):
    """What a drain needs of the fleet (checkpointer/daemon/fleet.py)."""

    host: str
    draining: bool

    def live_hosts(self) -> dict[str, float]: ...

    def view(self) -> list[Lease]: ...

    def set_draining(self, on: bool) -> None: ...

    def says_draining(self, host: str) -> bool: ...


def pick_targets(
    names: list[str],
    here: str,
    live: list[str],
    leases: list[Lease],
    draining: set[str],
    to: str | None,
) -> dict[str, str | None]:
    """Workload -> the host it goes to (None: none can take it). Least-loaded first: load is
    the count of leases a host holds, counting the workloads this drain already sent it, so
    three workloads spread over three idle hosts rather than all landing on the first."""
    targets = [to] if to else [h for h in live if h != here and h not in draining]
    load = Counter(lease.holder for lease in leases if lease.state != "released")
    out: dict[str, str | None] = {}
    for name in names:
        if not targets:
            out[name] = None
            continue
        host = min(targets, key=lambda h: (load[h], h))
        load[host] += 1
        out[name] = host
    return out


def drain(
    workloads: Workloads,
    migrate: Migrate,
    fleet: DrainingFleet,
    to: str | None,
    progress: Progress | None = None,
) -> DrainReport:
    """Migrate every workload running here; those that cannot move run on here, listed."""
    t0 = time.monotonic()
    live = sorted(fleet.live_hosts())
    if to is not None:
        if to == fleet.host:
            raise MigrationFailed(f"--to {to} is this host: give another host")
        if to not in live:
            raise MigrationFailed(
                f"host {to} is not a live host of this fleet (live: {', '.join(live)}); "
                "see `checkpointer hosts`"
            )
    draining = {h for h in live if h != fleet.host and fleet.says_draining(h)}
    if to in draining:
        raise MigrationFailed(f"host {to} is draining itself: pick another host")
    running = sorted(w.name for w in workloads.workloads() if w.alive())
    plan = pick_targets(running, fleet.host, live, fleet.view(), draining, to)
    outcomes: list[DrainOutcome] = []
    fleet.set_draining(True)
    try:
        for done, name in enumerate(running):
            if progress:
                progress(done, len(running))
            outcomes.append(_move(migrate, name, plan[name]))
        if progress:
            progress(len(running), len(running))
    finally:
        fleet.set_draining(False)
    for w in workloads.workloads():  # not running here: nothing to move, said so
        if not w.alive() and w.state is not WorkloadState.ELSEWHERE and w.name not in plan:
            why = f"not running here ({w.exit_status or w.state})"
            outcomes.append(_outcome(w.name, None, "stayed", 0.0, why))
    moved = sum(o["result"] == "moved" for o in outcomes)
    log.info("drain of %s: %d moved, %d stayed", fleet.host, moved, len(outcomes) - moved)
    return {
        "host": fleet.host,
        "duration_seconds": round(time.monotonic() - t0, 3),
        "workloads": outcomes,
    }


def _move(migrate: Migrate, name: str, to: str | None) -> DrainOutcome:
    if to is None:
        return _outcome(name, None, "stayed", 0.0, "no other live host that is not draining")
    t0 = time.monotonic()
    try:
        migrate(name, to)
    except (CheckpointerError, StorageError) as e:
        log.warning("drain: %s stays here: %s", name, e)
        return _outcome(name, to, "stayed", time.monotonic() - t0, str(e))
    return _outcome(name, to, "moved", time.monotonic() - t0, "")


def _outcome(name: str, to: str | None, result: str, took: float, why: str) -> DrainOutcome:
    return {
        "workload": name,
        "to": to,
        "result": result,
        "duration_seconds": round(took, 3),
        "why": why,
    }


def hosts(reports: Reports, fleet: DrainingFleet) -> list[HostReport]:
    """`checkpointer hosts`, with each host's `draining` from its heartbeat."""
    rows = reports.hosts()
    for row in rows:
        row["draining"] = fleet.draining if row["this_host"] else fleet.says_draining(row["host"])
    return rows
