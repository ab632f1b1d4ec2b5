"""The engine: workloads, and the operations on them, one at a time per workload.

Every operation that touches a workload's process or checkpoints (checkpoint, restore,
rollback, stop) holds that workload's lock, so they never overlap. The scheduler's checkpoint
skips a busy workload instead of queueing behind it. The work itself is done by the
collaborators: the registry (workloads.json), the checkpoint and restore pipelines, and
maintenance (retention, GC, spool).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from checkpointer.api import (
    CheckpointReport,
    PinReport,
    PruneReport,
    RestoreReport,
    RetentionRow,
    UnregisterReport,
)
from checkpointer.config import Config, WorkloadOptions
from checkpointer.criu import Criu
from checkpointer.engine import kept_image
from checkpointer.engine.checkpointing import CheckpointPipeline
from checkpointer.engine.events import Events
from checkpointer.engine.maintenance import Maintenance
from checkpointer.engine.registry import Registry
from checkpointer.engine.restoring import LogPaths, Restored, RestorePipeline, is_transient
from checkpointer.engine.scratch import Scratch
from checkpointer.engine.workload import (
    RestoreResult,
    Workload,
    WorkloadKind,
    WorkloadState,
)
from checkpointer.errors import (
    CheckpointerError,
    RestoreFailed,
    TeardownFailed,
    WorkloadBusy,
    WorkloadRunning,
)
from checkpointer.restore_policy import Streak, plan
from checkpointer.workloads import managed, process
from checkpointer.workloads.logs import LogPump
from storage import CheckpointNotFound, Repository
from storage.backends.spooled import SpooledBlobStore
from storage.errors import StorageAccessError, TransientStorageError
from storage.manifest import check_workload_name

log = logging.getLogger(__name__)

MANUAL_LOCK_TIMEOUT = 600.0


class Schedule(Protocol):
    def schedule(
        self, name: str, every: float | None, cron: str | None, jitter: float | None = None
    ) -> None: ...

    def unschedule(self, name: str) -> None: ...

    def next_run(self, name: str) -> datetime | None: ...


@dataclass(frozen=True)
class Hooks:
    """What the engine tells the supervisor: a tree has a new PID to watch; a tree is down and
    the restore policy should decide (a rollback that failed after stopping the tree)."""

    watch: Callable[[Workload], None] = lambda w: None
    down: Callable[[Workload, str], None] = lambda w, reason: None


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Engine:
    def __init__(
        self,
        config: Config,
        repo: Repository,
        criu: Criu,
        pump: LogPump,
        events: Events,
        schedule: Schedule,
        hooks: Hooks = Hooks(),
        spool: SpooledBlobStore | None = None,
    ) -> None:
        self.config = config
        self.repo = repo
        self.criu = criu
        self.pump = pump
        self.events = events
        self.schedule = schedule
        self.hooks = hooks
        self.spool = spool
        self.logs = LogPaths(config.state_dir / "logs")
        self.registry = Registry(config.state_dir / "workloads.json")
        self.scratch = Scratch(config.state_dir, config.criu.scratch_dir)
        self._criu_version: str | None = None
        self.checkpoints = CheckpointPipeline(
            repo, criu, self.scratch, events, config.criu.keep_latest_image, self.criu_version
        )
        self.restores = RestorePipeline(repo, criu, self.scratch, pump, self.logs)
        self.maintenance = Maintenance(repo, events, spool, config.storage.spool_max_bytes)

    # -- registry ----------------------------------------------------------------------

    def get(self, name: str) -> Workload:
        return self.registry.get(name)

    def workloads(self) -> list[Workload]:
        return self.registry.all()

    def save(self) -> None:
        self.registry.save()

    def load(self) -> None:
        """Take back the workloads a previous daemon registered (the supervisor then re-adopts
        or restores them)."""
        for w in self.registry.load():
            if w.managed:
                self.pump.attach(w.name, self.logs.fifo(w.name), self.logs.log(w.name))
            self.schedule.schedule(w.name, w.every, w.cron, w.jitter)
            self.events.workload_added(w.name)
            log.info("workload %s: %s (pid %s)", w.name, w.state, w.pid)

    def add(self, w: Workload, options: WorkloadOptions) -> None:
        """Register `w` with `options` (the caller started or checked its tree)."""
        check_workload_name(w.name)
        with_options(w, options, self.config)
        self.registry.add(w)
        self.events.workload_added(w.name)

    def scheduled(self, w: Workload) -> None:
        self.schedule.schedule(w.name, w.every, w.cron, w.jitter)

    def update_options(self, name: str, options: WorkloadOptions) -> None:
        w = with_options(self.get(name), options, self.config)
        self.scheduled(w)
        self.save()

    def forget(self, w: Workload) -> None:
        self.schedule.unschedule(w.name)
        self.registry.remove(w.name)
        kept_image.drop(w.kept)
        w.kept = None
        if w.managed:
            self.pump.detach(w.name)

    def unregister(self, name: str, keep_running: bool = False) -> UnregisterReport:
        """Stop checkpointing; a managed tree is stopped unless `keep_running`."""
        w = self.get(name)
        self.schedule.unschedule(name)
        stopped = False
        with self.locked(w, wait=True):
            if w.managed and not keep_running and w.alive():
                self.teardown(w)
                stopped = True
            self.forget(w)
        return {"workload": name, "stopped": stopped}

    # -- checkpoint and maintenance ------------------------------------------------------

    def scheduled_checkpoint(self, name: str) -> None:
        try:
            self.checkpoint(name, wait=False)
        except WorkloadBusy:
            log.info("scheduled checkpoint of %s skipped: another operation is running", name)
        except CheckpointerError as e:
            log.error("scheduled checkpoint of %s failed: %s", name, e)
        except Exception:
            log.exception("scheduled checkpoint of %s failed unexpectedly", name)

    def checkpoint(self, name: str, wait: bool = True) -> CheckpointReport:
        w = self.get(name)
        with self.locked(w, wait):
            try:
                report = self.checkpoints.run(w)
            finally:
                self.save()
            self.maintenance.apply_retention(w.name, w.retention, w.bad_checkpoints)
            self.maintenance.shed_spool()
            return report

    def prune(self, name: str | None = None, dry_run: bool = False) -> PruneReport:
        """Apply retention now (one workload or all), then collect unreferenced packs."""
        names = [name] if name else sorted(self.registry.names() | set(self.repo.workloads()))
        rows: list[RetentionRow] = []
        for n in names:
            w = self.registry.find(n)
            if w is None:
                check_workload_name(n)
                if not self.repo.checkpoints(n):
                    self.get(n)  # unknown here and nothing stored: the clear error
                rows += self.maintenance.apply_retention(n, self.config.retention, [], dry_run)
                continue
            with self.locked(w, wait=True):
                rows += self.maintenance.apply_retention(n, w.retention, w.bad_checkpoints, dry_run)
        gc = self.maintenance.collect_garbage(dry_run)
        return {"dry_run": dry_run, "checkpoints": rows, "gc": gc}

    def pin(self, name: str, checkpoint_id: str, unpin: bool = False) -> PinReport:
        if unpin:
            self.repo.unpin(name, checkpoint_id)
        else:
            self.repo.pin(name, checkpoint_id)
        return {"workload": name, "id": checkpoint_id, "pinned": not unpin}

    # -- restore and rollback ----------------------------------------------------------

    def restore(
        self,
        name: str,
        checkpoint_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> RestoreReport:
        """Restore a workload that is not running (registered here, or known to the repository)."""
        w = self.registry.find(name) or self._workload_from_repository(name, checkpoint_id)
        with self.locked(w, wait=True):
            if w.alive():
                raise WorkloadRunning(
                    f"workload {name} is running (pid {w.pid}); `checkpointer rollback {name}` "
                    "replaces it with a checkpoint, or stop it first"
                )
            cid = checkpoint_id or self.restores.newest(w)
            try:
                done = self.restores.restore(w, cid, "manual", progress)
            except Exception:
                self.events.restore_done(w.name, "manual", ok=False)
                self.save()
                raise
            self._after_restore(w, "manual", done.report["checkpoint"], done)
            w.streak = Streak()
            self.save()
            return done.report

    def rollback(self, name: str, to: str | None = None, back: int | None = None) -> RestoreReport:
        """Stop the running tree and restore an older checkpoint (`to` an id, or `back` N)."""
        w = self.get(name)
        with self.locked(w, wait=True):
            ids = [i.id for i in self.repo.checkpoints(name)]
            if to is None:
                n = back or 0
                if n < 0 or n >= len(ids):
                    raise CheckpointNotFound(
                        f"workload {name} has {len(ids)} checkpoint(s): cannot go back {n}; "
                        f"see `checkpointer list {name}`"
                    )
                to = ids[n]
            elif to not in ids:
                self.repo.read_manifest(name, to)  # raises the clear not-found error

            def stop() -> None:
                if w.alive():
                    self.teardown(w)

            try:
                done = self.restores.replace(w, to, stop)
            except Exception as e:
                self.events.restore_done(name, "rollback", ok=False)
                if w.alive():
                    raise  # failed before the stop: the tree runs on, nothing changed
                self._rollback_failed(w, to, e)
                raise RestoreFailed(
                    f"rollback of {name} to {to} failed after its tree was stopped: {e}; "
                    "the daemon restores its newest good checkpoint instead "
                    f"(`checkpointer status {name}`)"
                ) from e
            self._after_restore(w, "rollback", to, done)
            self.save()
            return done.report

    def _rollback_failed(self, w: Workload, to: str, e: Exception) -> None:
        w.record("rollback", RestoreResult.FAILED, str(e), to)
        if not (is_transient(e) or isinstance(e, TeardownFailed)):
            w.mark_bad(to)
        w.state, w.exit_status = WorkloadState.CRASHED, f"rollback to {to} failed"
        w.streak = Streak()
        self.save()
        self.hooks.down(w, "rollback")

    def _after_restore(self, w: Workload, reason: str, cid: str, done: Restored) -> None:
        self.events.restore_done(w.name, reason, True, done.duration, done.stats)
        w.record(reason, RestoreResult.OK, f"restored as pid {w.pid}", cid)
        self.hooks.watch(w)

    def _workload_from_repository(self, name: str, checkpoint_id: str | None) -> Workload:
        """A workload checkpointed elsewhere (another host: migration) becomes registered here."""
        check_workload_name(name)
        infos = self.repo.checkpoints(name)
        if not infos:
            self.get(name)  # raises: unknown here and nothing stored
        meta = self.repo.info(name, checkpoint_id).metadata if checkpoint_id else infos[0].metadata
        spec = meta.get("spec", {})
        w = Workload(
            name=name,
            kind=WorkloadKind(spec.get("kind", "adopted")),
            command=spec.get("command"),
            cwd=spec.get("cwd"),
        )
        self.add(w, WorkloadOptions.model_validate({"criu": spec.get("criu") or {}}))
        return w

    # -- automatic restore (called by the supervisor) ------------------------------------

    def auto_restore(self, name: str, reason: str) -> bool:
        """Bring a dead workload back by its restore policy. Returns True when it should be
        tried again later: it failed for a reason outside the checkpoint (storage down, a PID
        or port in use), so nothing was marked bad.

        Tries the good checkpoints the policy's plan names, newest first, marking each that
        is at fault as bad; then a cold start of a managed workload; then gives up.
        """
        w = self.registry.find(name)
        if w is None:
            return False
        with self.locked(w, wait=True):
            if w.alive() or w.state not in (
                WorkloadState.CRASHED,
                WorkloadState.EXITED,
                WorkloadState.RESTORING,
            ):
                return False  # restored by hand, stopped or unregistered meanwhile
            try:
                good = [c.id for c in self.repo.checkpoints(name) if c.id not in w.bad_checkpoints]
            except Exception as e:
                if not is_transient(e) and not _storage_down(e):
                    raise
                w.last_error = f"cannot list checkpoints: {e}"
                w.record(reason, RestoreResult.RETRY, f"{w.last_error}; trying again later")
                self.save()
                return True
            if not good and not self._remote_reachable():
                # After a reboot with the network not up yet, only the local spool answers:
                # "no checkpoint" would cold-start the workload and lose its state.
                w.last_error = "no checkpoint found locally and object storage is unreachable"
                w.record(reason, RestoreResult.RETRY, f"{w.last_error}; trying again later")
                self.save()
                return True
            steps = plan(w.restore, good, w.streak.depth, w.managed)
            for cid in steps.checkpoints:
                try:
                    done = self.restores.restore(w, cid, reason)
                except Exception as e:
                    self.events.restore_done(w.name, reason, ok=False)
                    if is_transient(e):
                        w.record(reason, RestoreResult.RETRY, f"{e}; trying again later", cid)
                        self.save()
                        return True
                    if not isinstance(e, CheckpointerError | CheckpointNotFound):
                        log.exception("restore of %s from %s failed unexpectedly", name, cid)
                    w.mark_bad(cid)
                    w.record(
                        reason, RestoreResult.FAILED, f"{e}; marked bad, trying the one before", cid
                    )
                    self.save()
                    continue
                self._after_restore(w, reason, cid, done)
                self._restored(w)
                return False
            if steps.cold_start:
                try:
                    self.start(w)
                except CheckpointerError as e:
                    w.record(reason, RestoreResult.FAILED, f"cold start failed: {e}")
                    self.events.restore_done(w.name, reason, ok=False)
                else:
                    self.events.restore_done(w.name, reason, ok=True)
                    w.record(
                        reason,
                        RestoreResult.OK,
                        f"no usable checkpoint left ({len(good)} good, "
                        f"depth {w.streak.depth}): cold-started from its command as pid {w.pid}",
                    )
                    self._restored(w)
                    return False
            self.fail(
                w,
                f"no checkpoint left to restore ({len(good)} good, stepped back "
                f"{w.streak.depth}, max_depth {w.restore.max_depth})"
                + ("" if w.managed else "; adopted workloads cannot cold-start"),
            )
            return False

    def _remote_reachable(self) -> bool:
        if self.spool is None:
            return True
        try:
            self.spool.remote.check()
        except (TransientStorageError, StorageAccessError):
            return False
        return True

    def _restored(self, w: Workload) -> None:
        w.streak = Streak(w.streak.attempts, w.streak.depth, time.time())
        self.save()

    def fail(self, w: Workload, why: str) -> None:
        w.state, w.failed_reason = WorkloadState.FAILED, why
        log.error(
            "workload %s failed: %s; fix the cause, then `checkpointer restore %s`",
            w.name,
            why,
            w.name,
        )
        self.save()

    # -- process lifecycle -------------------------------------------------------------

    def start(self, w: Workload) -> None:
        """Start a managed workload's command (a new tree, no state)."""
        assert w.command
        self.pump.attach(w.name, self.logs.fifo(w.name), self.logs.log(w.name))
        pid = managed.launch(
            w.name, w.command, Path(w.cwd) if w.cwd else None, w.env, self.logs.fifo(w.name)
        )
        w.pid, w.started = pid, process.start_time(pid)
        w.state, w.exit_status, w.last_error = WorkloadState.RUNNING, None, None
        self.save()
        self.hooks.watch(w)
        log.info("workload %s started: pid %d, command %s", w.name, pid, w.command)

    def teardown(self, w: Workload) -> None:
        assert w.pid is not None
        w.state = WorkloadState.STOPPING  # its death is ours: the supervisor must not restore it
        left = process.teardown(w.pid, w.started)
        if left:
            raise TeardownFailed(
                f"workload {w.name}: processes {left} did not go away after SIGKILL; "
                "they may be stuck in the kernel (state D); check `ps -o pid,stat,cmd -p ...`"
            )
        w.state, w.exit_status = WorkloadState.STOPPED, "stopped by checkpointer"
        self.save()

    def mark_dead(self, pid: int, status: int | None) -> Workload | None:
        """Record that a workload's root died (status None: not our child, status unknown).

        Returns the workload if this death is news: it was running and nobody stopped it.
        """
        w = self.registry.running_with_pid(pid)
        if w is None:
            return None
        if status is None:
            w.state, w.exit_status = WorkloadState.CRASHED, "exited (status unknown: not our child)"
        else:
            w.state = WorkloadState.EXITED if status == 0 else WorkloadState.CRASHED
            w.exit_status = describe_exit(status)
        log.warning("workload %s (pid %d) %s", w.name, pid, w.exit_status)
        self.save()
        return w

    def stop_managed(self) -> None:
        """Stop every managed tree (they stay registered, as `stopped`: nothing restores them)."""
        for w in self.workloads():
            if w.managed and w.alive():
                with self.locked(w, wait=True):
                    self.teardown(w)
                    log.info("workload %s stopped with the daemon", w.name)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for operations in flight to finish (shutdown): take and drop every lock."""
        for w in self.workloads():
            if w.lock.acquire(timeout=timeout):
                w.lock.release()

    # -- helpers -----------------------------------------------------------------------

    @contextmanager
    def locked(self, w: Workload, wait: bool) -> Iterator[None]:
        """The workload's lock: waits (up to MANUAL_LOCK_TIMEOUT) or refuses at once."""
        ok = w.lock.acquire(timeout=MANUAL_LOCK_TIMEOUT) if wait else w.lock.acquire(blocking=False)
        if not ok:
            raise WorkloadBusy(
                f"workload {w.name} is busy with another checkpoint, restore "
                "or rollback; try again when it has finished"
            )
        try:
            yield
        finally:
            w.lock.release()

    def criu_version(self) -> str:
        if self._criu_version is None:
            self._criu_version = self.criu.version()
        return self._criu_version


def with_options(w: Workload, options: WorkloadOptions, config: Config) -> Workload:
    w.every, w.cron, w.jitter = options.every, options.cron, options.jitter
    w.criu = options.criu
    w.retention = options.retention or config.retention
    w.restore = options.restore
    return w


def _storage_down(e: BaseException) -> bool:
    return isinstance(e, TransientStorageError | StorageAccessError)
