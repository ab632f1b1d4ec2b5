"""What `status`, `list` and `verify` report: read-only views of workloads and checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol

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
from checkpointer.engine import listing
from checkpointer.engine.checkpoint_spec import CheckpointSpec
from checkpointer.engine.marks import marks as restore_marks
from checkpointer.engine.parts import Schedule, Workloads
from checkpointer.engine.restoring import LogPaths
from checkpointer.engine.workload import DrillResult, Workload, WorkloadState
from checkpointer.errors import NotOwner
from storage import CheckpointNotFound, Repository, StorageError, marks
from storage.manifest import check_workload_name

if TYPE_CHECKING:
    from checkpointer.engine.ownership import Fleet, Ownership


class DrillSchedule(Protocol):
    """When a workload's next restore drill is due (checkpointer/engine/drills.py)."""

    def next_due(self, w: Workload) -> float | None: ...


class Reports:
    """`status`, `list`, `verify` and `hosts`: read-only, no workload's lock taken."""

    def __init__(
        self,
        workloads: Workloads,
        repo: Repository,
        schedule: Schedule,
        logs: LogPaths,
        ownership: Ownership,
        drills: DrillSchedule,
        fleet: Fleet | None,
    ) -> None:
        self.workloads = workloads
        self.repo = repo
        self.schedule = schedule
        self.logs = logs
        self.ownership = ownership
        self.drills = drills
        self.fleet = fleet

    def status(self, name: str | None = None) -> list[StatusReport]:
        items = [self.workloads.get(name)] if name else self.workloads.workloads()
        now = time.time()
        return [self._status(w, now) for w in items]

    def _status(self, w: Workload, now: float) -> StatusReport:
        state = w.state
        if state is WorkloadState.RUNNING and not w.alive():
            state = WorkloadState.GONE
        nxt = self.schedule.next_run(w.name)
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
            "log": str(self.logs.log(w.name)) if w.managed else None,
            "busy": w.lock.locked(),
            "owner": w.owner or self.ownership.owner(w.name),
            "drill": self._drill_summary(w, now),
        }

    def _drill_summary(self, w: Workload, now: float) -> DrillSummary:
        last = w.drills[-1] if w.drills else None
        proven = w.verified()
        return {
            "last_result": str(last.result) if last else None,
            "last_checkpoint": last.checkpoint if last else None,
            "last_time": last.time if last else None,
            "last_detail": last.detail if last else None,
            "verified_checkpoint": proven.checkpoint if proven else None,
            "verified_age_seconds": round(now - proven.created, 3) if proven else None,
            "next_drill": self.drills.next_due(w),
        }

    def list_checkpoints(self, name: str) -> list[CheckpointEntry]:
        check_workload_name(name)
        seen = listing.local_view(self.repo, name)  # during an outage: this host's, said so
        infos = seen.checkpoints
        w = self.workloads.find(name)
        if not infos and w is None:
            self.workloads.get(name)  # unknown and nothing stored: say so
        marked = restore_marks(w) if w is not None else {}
        verified = self._verified(name, w)
        specs = {i.id: CheckpointSpec.read(i.metadata) for i in infos}
        return [
            {
                "id": i.id,
                "created": i.created.isoformat(),
                "size_bytes": i.size_bytes,
                "new_bytes": i.new_bytes,
                "frozen_seconds": specs[i.id].frozen_seconds,
                "host": specs[i.id].host,
                "local_only": seen.local_only,
                "mark": marked[i.id][0] if i.id in marked else None,
                "mark_reason": marked[i.id][1] if i.id in marked else None,
                "verified": i.id in verified and i.id not in marked,
            }
            for i in infos
        ]

    def _verified(self, name: str, w: Workload | None) -> set[str]:
        """The checkpoints a restore drill verified: the marks stored with them (any host's), and
        this host's own record of its drills while the bucket cannot be read."""
        own = {d.checkpoint for d in w.drills if d.result is DrillResult.VERIFIED} if w else set()
        try:
            stored = marks.read(self.repo.backend, self.repo.codec, name)
        except StorageError:
            return own
        return {cid for cid, m in stored.items() if m.verified} | (own - set(stored))

    def verify(
        self,
        name: str,
        checkpoint_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Re-hash every chunk of one checkpoint (default: the newest) from the repository."""
        check_workload_name(name)
        if checkpoint_id is None:
            infos = self.repo.checkpoints(name)
            if not infos:
                self.workloads.get(name)
                raise CheckpointNotFound(f"workload {name} has no checkpoint to verify")
            checkpoint_id = infos[0].id
        m = self.repo.read_manifest(name, checkpoint_id)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, m.size_bytes)

        t0 = time.monotonic()
        with sandbox_priority.this_thread():  # as a drill's read: only on what workloads leave
            self.repo.verify(name, checkpoint_id, step)
        return {
            "workload": name,
            "id": checkpoint_id,
            "ok": True,
            "files": len(m.files),
            "size_bytes": m.size_bytes,
            "chunks": m.total_chunks,
            "duration_seconds": round(time.monotonic() - t0, 3),
        }

    def hosts(self) -> list[HostReport]:
        """The fleet's live hosts and the workloads each holds the lease of."""
        fleet = self.fleet
        if fleet is None:
            raise NotOwner(
                "this daemon is not in a fleet (fleet.enabled is false): no hosts to list"
            )
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
