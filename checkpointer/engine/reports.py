"""What `status`, `list` and `verify` report: read-only views of workloads and checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

from checkpointer.api import (
    CheckpointEntry,
    DrillSummary,
    HostReport,
    RestoreAttemptReport,
    StatusReport,
    VerifyReport,
)
from checkpointer.config.durations import format_duration
from checkpointer.criu.sandbox import priority as sandbox_priority
from checkpointer.engine import listing, recovery
from checkpointer.engine.facade import Engine
from checkpointer.engine.workload import DrillResult, Workload, WorkloadState
from checkpointer.errors import NotOwner
from storage import CheckpointNotFound, StorageError, marks
from storage.manifest import check_workload_name


def status(engine: Engine, name: str | None = None) -> list[StatusReport]:
    items = [engine.get(name)] if name else engine.workloads()
    now = time.time()
    return [_status(engine, w, now) for w in items]


def _status(engine: Engine, w: Workload, now: float) -> StatusReport:
    state = w.state
    if state is WorkloadState.RUNNING and not w.alive():
        state = WorkloadState.GONE
    nxt = engine.schedule.next_run(w.name)
    restores: list[RestoreAttemptReport] = [
        {**asdict(a), "result": str(a.result)}  # type: ignore[typeddict-item]
        for a in w.history[-5:]
    ]
    return {
        "name": w.name,
        "kind": str(w.kind),
        "container": w.container,
        "state": str(state),
        "pid": w.pid,
        "exit_status": w.exit_status,
        "command": w.command,
        "schedule": (
            f"every {format_duration(w.every)}"
            if w.every
            else f"cron {w.cron}"
            if w.cron
            else "manual"
        ),
        "last_checkpoint": w.last_checkpoint,
        "last_checkpoint_age_seconds": (
            round(now - w.last_checkpoint_at, 3) if w.last_checkpoint_at else None
        ),
        "next_checkpoint": nxt.isoformat() if nxt else None,
        "last_error": w.last_error,
        "failed_reason": w.failed_reason,
        "restores": restores,
        "restore_retries": w.streak.retries,
        "bad_checkpoints": w.bad_checkpoints,
        "log": str(engine.logs.log(w.name)) if w.managed else None,
        "busy": w.lock.locked(),
        "owner": w.owner or engine.ownership.owner(w.name),
        "drill": _drill_summary(engine, w, now),
    }


def _drill_summary(engine: Engine, w: Workload, now: float) -> DrillSummary:
    last = w.drills[-1] if w.drills else None
    proven = w.verified()
    return {
        "last_result": str(last.result) if last else None,
        "last_checkpoint": last.checkpoint if last else None,
        "last_time": last.time if last else None,
        "last_detail": last.detail if last else None,
        "verified_checkpoint": proven.checkpoint if proven else None,
        "verified_age_seconds": round(now - proven.created, 3) if proven else None,
        "next_drill": engine.drills.next_due(w),
    }


def list_checkpoints(engine: Engine, name: str) -> list[CheckpointEntry]:
    check_workload_name(name)
    seen = listing.local_view(engine.repo, name)  # during an outage: this host's, said so
    infos = seen.checkpoints
    w = engine.registry.find(name)
    if not infos and w is None:
        engine.get(name)  # unknown and nothing stored: say so
    marked = recovery.marks(w) if w is not None else {}
    verified = _verified(engine, name, w)
    return [
        {
            "id": i.id,
            "created": i.created.isoformat(),
            "size_bytes": i.size_bytes,
            "new_bytes": i.new_bytes,
            "frozen_seconds": i.metadata.get("dump_stats", {}).get("frozen_time"),
            "host": i.metadata.get("host"),
            "local_only": seen.local_only,
            "mark": marked[i.id][0] if i.id in marked else None,
            "mark_reason": marked[i.id][1] if i.id in marked else None,
            "verified": i.id in verified and i.id not in marked,
        }
        for i in infos
    ]


def _verified(engine: Engine, name: str, w: Workload | None) -> set[str]:
    """The checkpoints a restore drill verified: the marks stored with them (any host's), and
    this host's own record of its drills while the bucket cannot be read."""
    own = {d.checkpoint for d in w.drills if d.result is DrillResult.VERIFIED} if w else set()
    try:
        stored = marks.read(engine.repo.backend, engine.repo.codec, name)
    except StorageError:
        return own
    return {cid for cid, m in stored.items() if m.verified} | (own - set(stored))


def verify(
    engine: Engine,
    name: str,
    checkpoint_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Re-hash every chunk of one checkpoint (default: the newest) from the repository."""
    check_workload_name(name)
    if checkpoint_id is None:
        infos = engine.repo.checkpoints(name)
        if not infos:
            engine.get(name)
            raise CheckpointNotFound(f"workload {name} has no checkpoint to verify")
        checkpoint_id = infos[0].id
    m = engine.repo.read_manifest(name, checkpoint_id)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, m.size_bytes)

    t0 = time.monotonic()
    with sandbox_priority.this_thread():  # as a drill's read: only on what workloads leave
        engine.repo.verify(name, checkpoint_id, step)
    return {
        "workload": name,
        "id": checkpoint_id,
        "ok": True,
        "files": len(m.files),
        "size_bytes": m.size_bytes,
        "chunks": m.total_chunks,
        "duration_seconds": round(time.monotonic() - t0, 3),
    }


def hosts(engine: Engine) -> list[HostReport]:
    """The fleet's live hosts and the workloads each holds the lease of."""
    fleet = engine.fleet
    if fleet is None:
        raise NotOwner("this daemon is not in a fleet (fleet.enabled is false): no hosts to list")
    live = fleet.live_hosts()
    owned: dict[str, list[str]] = {}
    for lease in fleet.view():
        if lease.state != "released":
            owned.setdefault(lease.holder, []).append(lease.workload)
    return [
        {
            "host": h,
            "last_seen": seen,
            "this_host": h == fleet.host,
            "workloads": sorted(owned.get(h, [])),
        }
        for h, seen in sorted(live.items())
    ]
