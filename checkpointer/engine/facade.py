"""The engine: workloads, and the operations on them, one at a time per workload.

Every operation that touches a workload's process or checkpoints (checkpoint, restore,
rollback, stop) holds that workload's lock, so they never overlap. The scheduler's checkpoint
skips a busy workload instead of queueing behind it. The work itself is done by the
collaborators: the registry (workloads.json), the checkpoint and restore pipelines, and
maintenance (retention, GC, spool).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from checkpointer import containers
from checkpointer.api import (
    CheckpointReport,
    PinReport,
    PruneReport,
    RetentionRow,
    UnregisterReport,
)
from checkpointer.config import Config, WorkloadOptions
from checkpointer.containers import ContainerRuntime
from checkpointer.criu import Criu
from checkpointer.engine import kept_image
from checkpointer.engine.checkpointing import CheckpointPipeline
from checkpointer.engine.disk_images import DiskImages
from checkpointer.engine.drills import Drills
from checkpointer.engine.events import Events
from checkpointer.engine.fenced_ownership import FencedOwnership
from checkpointer.engine.lifecycle import Lifecycle
from checkpointer.engine.maintenance import Maintenance
from checkpointer.engine.ownership import Fleet, Ownership, SingleHost
from checkpointer.engine.parts import Hooks, Schedule
from checkpointer.engine.registry import Registry
from checkpointer.engine.restoring import LogPaths, RestorePipeline
from checkpointer.engine.scratch import Scratch
from checkpointer.engine.workload import (
    Workload,
    WorkloadState,
)
from checkpointer.errors import (
    CheckpointerError,
    NotOwner,
    WorkloadBusy,
    WorkloadNotRunning,
)
from checkpointer.workloads.logs import LogPump
from storage import Repository
from storage.backends.spooled import SpooledBlobStore
from storage.manifest import check_workload_name

log = logging.getLogger(__name__)

MANUAL_LOCK_TIMEOUT = 600.0


class Engine:
    def __init__(
        self,
        config: Config,
        repo: Repository,
        criu: Criu,
        pump: LogPump,
        events: Events,
        schedule: Schedule,
        hooks: Hooks | None = None,
        spool: SpooledBlobStore | None = None,
        ownership: Ownership | None = None,
        fleet: Fleet | None = None,
        runtimes: dict[str, ContainerRuntime] | None = None,
    ) -> None:
        # Fleet: claiming a lease also fences the workload's head (fenced_ownership.py).
        self.ownership: Ownership = (
            FencedOwnership(ownership, repo) if ownership is not None else SingleHost()
        )
        self.fleet = fleet
        self.config = config
        self.repo = repo
        self.criu = criu
        self.pump = pump
        self.events = events
        self.schedule = schedule
        self.hooks = hooks or Hooks()
        self.spool = spool
        self.logs = LogPaths(config.state_dir / "logs")
        self.registry = Registry(config.state_dir / "workloads.json")
        self.scratch = Scratch(config.state_dir, config.criu.scratch_dir)
        self.disk = DiskImages(config.state_dir / "images", config.criu.disk_images)
        self._criu_version: str | None = None
        self.runtimes = (
            runtimes
            if runtimes is not None
            else containers.runtimes(
                config.state_dir / "logs" / "container-failed", config.criu.timeout
            )
        )
        self.checkpoints = CheckpointPipeline(
            repo,
            criu,
            self.scratch,
            events,
            config.criu.keep_latest_image,
            self.criu_version,
            self.logs.fifo,
            self.runtimes,
            self.disk,
        )
        self.restores = RestorePipeline(
            repo, criu, self.scratch, pump, self.logs, self.runtimes, self.disk
        )
        self.maintenance = Maintenance(
            repo,
            events,
            spool,
            config.storage.spool_max_bytes,
            owned=lambda: [
                w.name for w in self.workloads() if w.state is not WorkloadState.ELSEWHERE
            ],
        )
        self.lifecycle = Lifecycle(
            self.registry, pump, self.logs, lambda w: self.hooks.watch(w), self.runtimes
        )
        self.drills = Drills(
            self.registry,
            repo,
            criu,
            self.restores,
            self.scratch,
            self.ownership,
            events,
            config.host.id,
            self.locked,
        )

    # -- registry ----------------------------------------------------------------------

    def get(self, name: str) -> Workload:
        return self.registry.get(name)

    def find(self, name: str) -> Workload | None:
        return self.registry.find(name)

    def workloads(self) -> list[Workload]:
        return self.registry.all()

    def save(self) -> None:
        self.registry.save()

    def load(self) -> None:
        """Take back the workloads a previous daemon registered (the supervisor then re-adopts
        or restores them)."""
        for w in self.registry.load():
            w.disk = self.disk.prune(w.name, w.disk)  # criu.disk_images lowered: not kept
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

    def unschedule(self, name: str) -> None:
        self.schedule.unschedule(name)

    def update_options(self, name: str, options: WorkloadOptions) -> None:
        w = with_options(self.get(name), options, self.config)
        self.scheduled(w)
        self.save()

    def forget(self, w: Workload) -> None:
        self.schedule.unschedule(w.name)
        self.registry.remove(w.name)
        self.drop_images(w)
        if w.managed:
            self.pump.detach(w.name)

    def drop_images(self, w: Workload) -> None:
        """The kept image and the disk images of a workload no longer ours to restore."""
        kept_image.drop(w.kept)
        w.kept = None
        self.disk.drop_all(w.name)
        w.disk = []

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
        self.ownership.release(name)
        return {"workload": name, "stopped": stopped}

    # -- checkpoint and maintenance ------------------------------------------------------

    def scheduled_checkpoint(self, name: str) -> None:
        try:
            self.checkpoint(name, wait=False)
        except WorkloadBusy:
            log.info("scheduled checkpoint of %s skipped: another operation is running", name)
        except NotOwner as e:
            log.warning("scheduled checkpoint of %s skipped: %s", name, e)
        except WorkloadNotRunning as e:  # a crash the supervisor sees to
            log.info("scheduled checkpoint of %s skipped: %s", name, e)
        except CheckpointerError as e:
            log.error("scheduled checkpoint of %s failed: %s", name, e)
        except Exception:
            log.exception("scheduled checkpoint of %s failed unexpectedly", name)

    def checkpoint(self, name: str, wait: bool = True) -> CheckpointReport:
        w = self.get(name)
        with self.locked(w, wait):
            generation = self.ownership.hold(name)
            try:
                report = self.checkpoints.run(w, generation)
            finally:
                self.save()
            self.maintenance.apply_retention(w.name, w.retention, w.bad_checkpoints)
            self.maintenance.shed_spool()
            return report

    def prune(self, name: str | None = None, dry_run: bool = False) -> PruneReport:
        """Apply retention now (one workload, or all of this host's), then collect
        unreferenced packs. Without a name, workloads of other hosts sharing the repository
        are left to them: their retention is not ours to decide."""
        names = [name] if name else sorted(self.registry.names())
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
        gc = self.maintenance.collect_garbage(dry_run, also=[name] if name else [])
        return {"dry_run": dry_run, "checkpoints": rows, "gc": gc}

    def pin(self, name: str, checkpoint_id: str, unpin: bool = False) -> PinReport:
        if unpin:
            self.repo.unpin(name, checkpoint_id)
        else:
            self.repo.pin(name, checkpoint_id)
        return {"workload": name, "id": checkpoint_id, "pinned": not unpin}

    def newest_checkpoint(self, name: str) -> str | None:
        infos = self.repo.checkpoints(name)
        return infos[0].id if infos else None

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
        self.lifecycle.start(w)

    def teardown(self, w: Workload) -> None:
        self.lifecycle.teardown(w)

    def mark_dead(self, pid: int, status: int | None) -> Workload | None:
        return self.lifecycle.mark_dead(pid, status)

    def stop_managed(self) -> None:
        """Stop every managed tree (they stay registered, as `stopped`: nothing restores them)."""
        for w in self.workloads():
            if w.managed and w.alive():
                with self.locked(w, wait=True):
                    self.teardown(w)
                    log.info("workload %s stopped with the daemon", w.name)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for operations in flight to finish (shutdown): take and drop every lock, and
        let lazy restores finish (their page server dies with the daemon: a tree still
        missing pages then would be killed rather than left waiting for them forever)."""
        for w in self.workloads():
            if w.lock.acquire(timeout=timeout):
                w.lock.release()
            inflight = w.lazy
            if inflight is not None and not inflight.restore.wait(timeout):
                inflight.restore.abort("the daemon is stopping")
                inflight.restore.wait(10)

    # -- helpers -----------------------------------------------------------------------

    @contextmanager
    def locked(self, w: Workload, wait: bool) -> Iterator[None]:
        """The workload's lock: waits (up to MANUAL_LOCK_TIMEOUT) or refuses at once."""
        ok = w.lock.acquire(timeout=MANUAL_LOCK_TIMEOUT) if wait else w.lock.acquire(blocking=False)
        if not ok:
            raise WorkloadBusy.named(w.name)
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
    w.drill = options.drill
    return w
