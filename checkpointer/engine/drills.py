"""Restore drills: prove a checkpoint restores before it is needed, not during the outage.

A drill rebuilds a checkpoint's image from the repository (every chunk verified, as a restore
after a reboot would) and has CRIU restore it in a sandbox that cannot touch the live tree
(checkpointer/criu/sandbox/: its own namespaces, the file systems copy-on-write, the tree left
stopped and killed). What it finds is kept with the checkpoint (storage/marks.py, sealed) and in
the workload's record (`drills`, for `status` and `list`):

- verified: CRIU restored every process, file and socket. Retention keeps a workload's newest
  verified checkpoint whatever its rules say (storage/retention.py).
- failed: CRIU refused it (a file that changed size, a socket it cannot re-create, a damaged
  chunk): the checkpoint is marked bad, as a failed restore would mark it, so the restore policy
  skips it; the reason is one line in `list` and the log.
- error: the drill could not tell (storage unreachable, the sandbox could not be built, the
  host too full): nothing is marked, as for a restore that fails outside the checkpoint.

Cost to the live workload: the workload's lock is held only while the checkpoint is read (a
checkpoint then waits, a scheduled one is skipped, as behind any operation); the sandbox runs
without it, one drill at a time on the host and never two of one workload. The daemon's
thread that rebuilds the image runs at nice 10, the sandbox at nice 19, both at the lowest
best-effort I/O level (checkpointer/criu/sandbox/priority.py, with what was measured: a drill
still raises the live p99 by x1.2 to x1.5 here, through something other than its CPU share).
Scheduled
drills (`drill.every`) run in a thread of their own, so a long one never holds the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from checkpointer.api import DrillReport
from checkpointer.criu import Criu, CriuError
from checkpointer.criu.sandbox import cgroup as sandbox_cgroup
from checkpointer.criu.sandbox import priority as sandbox_priority
from checkpointer.criu.sandbox.restore import SANDBOX_CATEGORIES, SandboxRestore, restore_in_sandbox
from checkpointer.engine import listing, spec
from checkpointer.engine.events import Events
from checkpointer.engine.ownership import Ownership
from checkpointer.engine.registry import Registry
from checkpointer.engine.restoring import RestorePipeline, is_transient
from checkpointer.engine.scratch import Scratch
from checkpointer.engine.workload import DrillRecord, DrillResult, Workload
from checkpointer.errors import CheckpointerError, RestoreFailed, WorkloadBusy
from checkpointer.workloads.logs import open_for_workload
from storage import CheckpointNotFound, Repository, StorageError, marks
from storage.errors import StorageAccessError, TransientStorageError

log = logging.getLogger(__name__)

TICK = 5.0  # seconds between looks at which scheduled drills are due
ERROR_RETRY = 600.0  # a drill that could not tell is tried again this soon (at the latest)


class DrillRefused(CheckpointerError):
    kind = "drill-refused"


Locked = Callable[[Workload, bool], AbstractContextManager[None]]


class Drills:
    """Drills of the registered workloads: on demand (`drill`) and as scheduled (`run_due`)."""

    def __init__(
        self,
        registry: Registry,
        repo: Repository,
        criu: Criu,
        restores: RestorePipeline,
        scratch: Scratch,
        ownership: Ownership,
        events: Events,
        host: str,
        locked: Locked,
    ) -> None:
        self.registry = registry
        self.repo = repo
        self.criu = criu
        self.restores = restores
        self.scratch = scratch
        self.ownership = ownership
        self.events = events
        self.host = host
        self.locked = locked
        self._running: set[str] = set()
        self._mutex = threading.Lock()
        self._sandbox = threading.Lock()  # one sandbox at a time on this host
        self._worker: threading.Thread | None = None
        self._said_unthrottled = False

    # -- when -------------------------------------------------------------------------

    def due(self, w: Workload, now: float) -> bool:
        """Whether `w`'s scheduled drill is due: drills on, a tree of its own running here
        (containers are restored by their runtimes), a checkpoint to drill, and `drill.every`
        since the last drill (the first drill follows the first checkpoint)."""
        if not w.drill.every or w.kind.is_container or w.last_checkpoint is None:
            return False
        if not w.alive() or w.owner is not None:
            return False
        if not w.drills:
            return True
        last = w.drills[-1]
        wait = w.drill.every
        if last.result is DrillResult.ERROR:  # not the checkpoint's fault: try again sooner
            wait = min(wait, ERROR_RETRY)
        return now - last.time >= wait

    def next_due(self, w: Workload) -> float | None:
        """When `w`'s next scheduled drill is due (Unix time), None when it has none."""
        if not w.drill.every:
            return None
        if not w.drills:
            return time.time()
        last = w.drills[-1]
        wait = min(w.drill.every, ERROR_RETRY) if last.result is DrillResult.ERROR else None
        return last.time + (wait or w.drill.every)

    def run_due(self) -> None:
        """The scheduler's tick: start the drills that are due, one after the other, in a
        thread of their own (a drill takes a restore's time; the tick returns at once)."""
        with self._mutex:
            if self._worker is not None and self._worker.is_alive():
                return
            now = time.time()
            due = [w.name for w in self.registry.all() if self.due(w, now)]
            if not due:
                return
            self._worker = threading.Thread(
                target=self._run_scheduled, args=(due,), name="drills", daemon=True
            )
            self._worker.start()

    def _run_scheduled(self, names: list[str]) -> None:
        for name in names:
            try:
                self._drill(name, None, scheduled=True)
            except WorkloadBusy as e:
                log.info("scheduled drill of %s skipped: %s", name, e)
            except CheckpointerError as e:
                log.warning("scheduled drill of %s not run: %s", name, e)
            except StorageError as e:
                log.warning("scheduled drill of %s not run: %s", name, e)
            except Exception:
                log.exception("scheduled drill of %s failed unexpectedly", name)

    def sweep(self) -> None:
        """Remove the drill folders a killed daemon left (an image each). At start, before
        any drill can run: a folder of a drill in progress looks the same."""
        with contextlib.suppress(OSError):
            for folder in self.scratch.root().glob("*-drill-*"):
                shutil.rmtree(folder, ignore_errors=True)
        sandbox_cgroup.remove_stale()

    # -- a drill ----------------------------------------------------------------------

    def drill(self, name: str, checkpoint_id: str | None = None) -> DrillReport:
        """`checkpointer drill NAME [ID]`: drill `checkpoint_id` of `name` (default: its
        newest), waiting for the workload's lock, and record what it found."""
        return self._drill(name, checkpoint_id, scheduled=False)

    def _drill(self, name: str, checkpoint_id: str | None, scheduled: bool) -> DrillReport:
        """A drill; scheduled, a workload busy with another operation is skipped."""
        w = self.registry.get(name)
        if w.kind.is_container:
            raise DrillRefused(
                f"{name} is a {w.kind} container: its runtime restores it, with its own "
                "namespaces and root file system, so it cannot be drilled in this sandbox"
            )
        with self._one_drill(name), sandbox_priority.this_thread():
            t0 = time.monotonic()
            cid, created, images = checkpoint_id or "", 0.0, None
            try:
                try:
                    with self.locked(w, not scheduled):  # only while the checkpoint is read
                        self.ownership.hold(name)  # the owner's to drill (fleet)
                        cid = self._choose(w, checkpoint_id)
                        info = self.repo.info(name, cid)
                        created = info.created.timestamp()
                        images = self.scratch.new(name, "drill", self._tmpfs_for(w))
                        self.restores.materialize(w, cid, images)
                    rebuilt = time.monotonic() - t0
                except (TransientStorageError, StorageAccessError, RestoreFailed) as e:
                    error = not isinstance(e, RestoreFailed) or is_transient(e)
                    return self._record(w, cid, created, t0, e, error)
                try:
                    with self._sandbox, self._cgroup() as cgroups:
                        done = self._restore(w, cid, images, info.metadata, cgroups)
                except (CriuError, RestoreFailed) as e:  # RestoreFailed: a malformed spec
                    error = is_transient(e) or getattr(e, "category", "") in SANDBOX_CATEGORIES
                    return self._record(w, cid, created, t0, e, error)
                return self._record(w, cid, created, t0, done, rebuilt=rebuilt)
            finally:
                if images is not None:
                    shutil.rmtree(images.parent, ignore_errors=True)

    @contextlib.contextmanager
    def _one_drill(self, name: str) -> Iterator[None]:
        with self._mutex:
            if name in self._running:
                raise WorkloadBusy(f"a restore drill of {name} is already running")
            self._running.add(name)
        try:
            yield
        finally:
            with self._mutex:
                self._running.discard(name)

    def _choose(self, w: Workload, checkpoint_id: str | None) -> str:
        """The checkpoint to drill: the one named, or the newest (in a fleet, in its head's
        order); only one this host may restore."""
        ids = [c.id for c in listing.checkpoints(self.repo, w.name, w.last_checkpoint).checkpoints]
        if checkpoint_id is None:
            if not ids:
                raise CheckpointNotFound(
                    f"workload {w.name} has no checkpoint to drill; take one with "
                    f"`checkpointer checkpoint {w.name}`"
                )
            return ids[0]
        if checkpoint_id not in ids:
            self.repo.read_manifest(w.name, checkpoint_id)  # the clear not-found error
            raise CheckpointNotFound(
                f"checkpoint {checkpoint_id} of {w.name} is not one this host may restore "
                f"(`checkpointer list {w.name}`)"
            )
        return checkpoint_id

    def _tmpfs_for(self, w: Workload) -> int | None:
        """The live tree's PID, for the image to go to tmpfs when it has room for it (as a
        dump's does: Scratch.root), with `shm` in DRILL_PRIORITY; else None (the disk)."""
        if sandbox_priority.SHM not in sandbox_priority.DRILL_PRIORITY or not w.alive():
            return None
        return w.pid

    @contextlib.contextmanager
    def _cgroup(self) -> Iterator[list[str]]:
        """The sandbox's cgroup with its CPU quota (when DRILL_PRIORITY has `throttle`): the
        `cgroup.procs` files its PID 1 joins; removed when the drill ends."""
        if sandbox_priority.THROTTLE not in sandbox_priority.DRILL_PRIORITY:
            yield []
            return
        with sandbox_cgroup.sandbox_cgroup() as group:
            if group.notes and not self._said_unthrottled:  # once: the host will not change
                self._said_unthrottled = True
                log.info("restore drills run without their CPU quota: %s", "; ".join(group.notes))
            yield group.procs()

    def _restore(
        self,
        w: Workload,
        cid: str,
        images: Path,
        metadata: dict[str, object],
        cgroups: list[str],
    ) -> SandboxRestore:
        """CRIU in the sandbox. A managed tree's output FIFO is handed over as in a real
        restore (restoring.py), here a FIFO of the drill's own that nothing reads."""
        inherit: list[tuple[int, str]] = []
        if w.managed:
            fifo = images.parent / "output.fifo"
            os.mkfifo(fifo, 0o600)
            dumped = spec.read(metadata, w.name, cid).log_fifo
            dumped = dumped or str(self.restores.logs.fifo(w.name))
            inherit.append((open_for_workload(fifo), dumped.lstrip("/")))
        try:
            opts = w.dump_options()
            return restore_in_sandbox(self.criu, images, opts, w.name, inherit, cgroups)
        finally:
            for fd, _ in inherit:
                os.close(fd)

    def _record(
        self,
        w: Workload,
        cid: str,
        created: float,
        t0: float,
        outcome: SandboxRestore | Exception,
        error: bool = False,
        rebuilt: float | None = None,
    ) -> DrillReport:
        """Keep what the drill found: in the workload's record, with the checkpoint (a mark),
        as a bad mark when the checkpoint is at fault; log it and count it."""
        seconds = time.monotonic() - t0
        if isinstance(outcome, SandboxRestore):
            result, detail = (
                DrillResult.VERIFIED,
                (
                    f"CRIU restored its {outcome.processes} process(es) in a sandbox"
                    + (f" ({'; '.join(outcome.notes)})" if outcome.notes else "")
                ),
            )
        else:
            result = DrillResult.ERROR if error else DrillResult.FAILED
            detail = " ".join(str(outcome).split())
        record = DrillRecord(time.time(), cid, created, result, detail, round(seconds, 3))
        w.record_drill(record)
        if result is DrillResult.FAILED:
            w.mark_bad(cid)
        if result is not DrillResult.ERROR:
            self._mark(w.name, record)
        self.registry.save()
        self.events.drill_done(w.name, str(result), seconds)
        level = logging.INFO if result is DrillResult.VERIFIED else logging.WARNING
        log.log(level, "restore drill of %s, checkpoint %s: %s: %s", w.name, cid, result, detail)
        report: DrillReport = {
            "workload": w.name,
            "checkpoint": cid,
            "result": str(result),
            "detail": detail,
            "duration_seconds": round(seconds, 3),
            "marked_bad": result is DrillResult.FAILED,
        }
        if isinstance(outcome, SandboxRestore):
            report["processes"] = outcome.processes
            report["restore_stats"] = outcome.stats.as_dict()
            report["sandbox_seconds"] = round(outcome.seconds, 3)
        if rebuilt is not None:
            report["rebuild_seconds"] = round(rebuilt, 3)
        return report

    def _mark(self, name: str, record: DrillRecord) -> None:
        """The verdict, stored with the checkpoint (retention reads it, other hosts see it);
        a failure to store it is logged, never lost from the workload's record."""
        mark = marks.Mark(
            record.checkpoint,
            record.result is DrillResult.VERIFIED,
            record.time,
            self.host,
            "" if record.result is DrillResult.VERIFIED else record.detail,
            record.seconds,
        )
        try:
            self.repo.write_mark(name, mark)
        except StorageError as e:
            log.warning("the drill's mark of %s %s was not stored: %s", name, mark.id, e)
