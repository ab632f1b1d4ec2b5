"""The engine: workloads, and the operations on them, one at a time per workload.

Every operation that touches a workload's process or checkpoints (checkpoint, restore,
rollback, stop) holds that workload's lock, so they never overlap. The scheduler's checkpoint
skips a busy workload instead of queueing behind it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from checkpointer import hostinfo
from checkpointer.config import Config, Retention, WorkloadOptions
from checkpointer.config.durations import format_duration
from checkpointer.criu import Criu, CriuError, DumpOptions
from checkpointer.daemon.metrics import Metrics
from checkpointer.daemon.scheduler import CheckpointScheduler, check_cron
from checkpointer.engine import kept_image
from checkpointer.errors import (
    CheckpointerError,
    CheckpointFailed,
    ProcessNotFound,
    RestoreFailed,
    WorkloadBusy,
    WorkloadExists,
    WorkloadNotFound,
    WorkloadNotRunning,
    WorkloadRunning,
)
from checkpointer.restore_policy import RestorePolicy, plan
from checkpointer.workloads import managed, process
from checkpointer.workloads.logs import LogPump, ensure_fifo
from storage import CheckpointNotFound, Repository, StorageError, retention
from storage.backends.spooled import SpooledBlobStore
from storage.manifest import check_workload_name

log = logging.getLogger(__name__)

MANUAL_LOCK_TIMEOUT = 600.0
HISTORY = 20


@dataclass
class Workload:
    """A registered process tree and what the daemon knows of it. Persisted across restarts."""

    name: str
    kind: str  # "managed" (started by us, own PID namespace) or "adopted"
    command: list[str] | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    every: float | None = None
    cron: str | None = None
    jitter: float | None = None
    criu: dict[str, bool] = field(default_factory=dict)
    retention: dict[str, Any] = field(default_factory=lambda: {"keep_last": 10})
    restore: dict[str, Any] = field(default_factory=dict)  # RestorePolicy fields
    pid: int | None = None
    started: int | None = None  # /proc start time of `pid`: tells a reused PID apart
    # running | stopping | stopped | exited | crashed | restoring | failed
    state: str = "stopped"
    exit_status: str | None = None
    last_checkpoint: str | None = None
    last_checkpoint_at: float | None = None
    last_error: str | None = None
    failed_reason: str | None = None
    streak: dict[str, Any] = field(default_factory=dict)  # restore_policy.Streak fields
    bad_checkpoints: list[str] = field(default_factory=list)
    hot_image: dict[str, Any] = field(default_factory=dict)  # newest image kept: id, path, stamp
    history: list[dict[str, Any]] = field(default_factory=list)  # restore attempts, newest last
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def persistable(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}

    def dump_options(self) -> DumpOptions:
        return DumpOptions(**self.criu)

    def policy(self) -> RestorePolicy:
        return RestorePolicy(**self.restore)

    def record(self, reason: str, result: str, detail: str, checkpoint: str | None = None) -> None:
        """Keep the last HISTORY restore attempts, for `status` and the log."""
        self.history.append(
            {
                "time": time.time(),
                "reason": reason,
                "checkpoint": checkpoint,
                "result": result,
                "detail": detail,
            }
        )
        del self.history[:-HISTORY]
        log.log(
            logging.INFO if result == "ok" else logging.WARNING,
            "restore of %s (%s) from %s: %s: %s",
            self.name,
            reason,
            checkpoint or "its command",
            result,
            detail,
        )

    def alive(self) -> bool:
        return self.pid is not None and process.is_alive(self.pid, self.started)


def _with_options(w: Workload, options: WorkloadOptions, default_retention: Retention) -> Workload:
    if options.cron:
        check_cron(options.cron)
    w.every, w.cron, w.jitter = options.every, options.cron, options.jitter
    w.criu = options.criu.model_dump()
    w.retention = (options.retention or default_retention).model_dump(exclude_none=True)
    w.restore = options.restore.model_dump()
    return w


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
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.repo = repo
        self.criu = criu
        self.pump = pump
        self.scheduler = CheckpointScheduler(
            self._scheduled_checkpoint,
            on_skip=lambda reason: self.metrics.schedule_skipped.labels(reason).inc(),
        )
        # Called with every workload whose tree gets a new PID (the supervisor watches it).
        self.on_new_pid: Callable[[Workload], None] = lambda w: None
        self._workloads: dict[str, Workload] = {}
        self._registry_lock = threading.Lock()
        self._criu_version: str | None = None
        self.state_dir = config.state_dir
        self.registry_file = self.state_dir / "workloads.json"
        self.previous_boot_id: str | None = None
        self.retention_deleted = 0
        self.spool: SpooledBlobStore | None = None
        self.spool_dropped = 0
        self.logs_dir = self.state_dir / "logs"

    # -- registry ----------------------------------------------------------------------

    def get(self, name: str) -> Workload:
        w = self._workloads.get(name)
        if w is None:
            known = ", ".join(sorted(self._workloads)) or "none"
            raise WorkloadNotFound(
                f"unknown workload {name!r} (registered: {known}); "
                "see `checkpointer status`, or add it with `checkpointer run`/`register`"
            )
        return w

    def _add(self, w: Workload) -> None:
        with self._registry_lock:
            if w.name in self._workloads:
                raise WorkloadExists(
                    f"workload {w.name!r} is already registered; pick another name or "
                    f"`checkpointer unregister {w.name}` first"
                )
            self._workloads[w.name] = w
        self.save()

    def save(self) -> None:
        """Write the registry atomically: a restarted daemon re-adopts what it lists."""
        with self._registry_lock:
            doc = {
                "boot_id": hostinfo.boot_id(),
                "workloads": [w.persistable() for w in self._workloads.values()],
            }
        tmp = self.registry_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.registry_file)

    def load(self) -> None:
        """Re-adopt the workloads a previous daemon registered, if their trees still run."""
        try:
            doc = json.loads(self.registry_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error(
                "cannot read %s (%s): starting with no registered workloads", self.registry_file, e
            )
            return
        self.previous_boot_id = doc.get("boot_id")
        for item in doc.get("workloads", []):
            w = Workload(**item)
            self._workloads[w.name] = w
            if w.kind == "managed":
                self.pump.attach(w.name, self.fifo(w.name), self.log_file(w.name))
            self.scheduler.schedule(w.name, w.every, w.cron, w.jitter)
            log.info("workload %s: %s (pid %s)", w.name, w.state, w.pid)

    def fifo(self, name: str) -> Path:
        return self.logs_dir / f"{name}.fifo"

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    # -- registering -------------------------------------------------------------------

    def run(
        self,
        name: str,
        command: list[str],
        options: WorkloadOptions,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Workload:
        """Start `command` as a managed workload and register it."""
        check_workload_name(name)
        w = _with_options(
            Workload(
                name=name, kind="managed", command=list(command), cwd=cwd, env=dict(env or {})
            ),
            options,
            self.config.retention,
        )
        self._add(w)
        try:
            with w.lock:
                self._start(w)
        except CheckpointerError:
            with self._registry_lock:
                self._workloads.pop(name, None)
            self.save()
            raise
        self.scheduler.schedule(name, w.every, w.cron, w.jitter)
        return w

    def _start(self, w: Workload) -> None:
        assert w.command
        self.pump.attach(w.name, self.fifo(w.name), self.log_file(w.name))
        pid = managed.launch(
            w.name, w.command, Path(w.cwd) if w.cwd else None, w.env, self.fifo(w.name)
        )
        w.pid, w.started = pid, process.start_time(pid)
        w.state, w.exit_status, w.last_error = "running", None, None
        self.save()
        self.on_new_pid(w)
        log.info("workload %s started: pid %d, command %s", w.name, pid, w.command)

    def register(
        self,
        name: str,
        *,
        pid: int | None = None,
        pidfile: str | None = None,
        options: WorkloadOptions,
    ) -> Workload:
        """Adopt a process tree started elsewhere."""
        check_workload_name(name)
        if pidfile is not None:
            try:
                pid = int(Path(pidfile).read_text().split()[0])
            except (OSError, ValueError, IndexError) as e:
                raise ProcessNotFound(f"cannot read a PID from pidfile {pidfile}: {e}") from e
        if pid is None or pid <= 0 or not process.is_alive(pid):
            raise ProcessNotFound(
                f"no running process has PID {pid}; check the PID "
                "(`ps -p PID`) and register a live process"
            )
        if pid == os.getpid():
            raise ProcessNotFound("cannot register the checkpointer daemon itself")
        w = _with_options(
            Workload(
                name=name, kind="adopted", pid=pid, started=process.start_time(pid), state="running"
            ),
            options,
            self.config.retention,
        )
        self._add(w)
        self.on_new_pid(w)
        self.scheduler.schedule(name, w.every, w.cron, w.jitter)
        log.info("workload %s adopted: pid %d", name, pid)
        return w

    def update_options(self, name: str, options: WorkloadOptions) -> None:
        w = _with_options(self.get(name), options, self.config.retention)
        self.scheduler.schedule(name, w.every, w.cron, w.jitter)
        self.save()

    def unregister(self, name: str, keep_running: bool = False) -> dict[str, Any]:
        """Stop checkpointing; a managed tree is stopped unless `keep_running`."""
        w = self.get(name)
        self.scheduler.unschedule(name)
        stopped = False
        with self._locked(w, wait=True):
            if w.kind == "managed" and not keep_running and w.alive():
                self._teardown(w)
                stopped = True
            with self._registry_lock:
                self._workloads.pop(name, None)
            self._drop_hot(w)
        if w.kind == "managed":
            self.pump.detach(name)
        self.save()
        return {"workload": name, "stopped": stopped}

    # -- status ------------------------------------------------------------------------

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        items = [self.get(name)] if name else sorted(self._workloads.values(), key=lambda w: w.name)
        out = []
        now = time.time()
        for w in items:
            state = w.state
            if state == "running" and not w.alive():
                state = "gone"
            nxt = self.scheduler.next_run(w.name)
            out.append(
                {
                    "name": w.name,
                    "kind": w.kind,
                    "state": state,
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
                    "restores": w.history[-5:],
                    "bad_checkpoints": w.bad_checkpoints,
                    "log": str(self.log_file(w.name)) if w.kind == "managed" else None,
                    "busy": w.lock.locked(),
                }
            )
        return out

    def list_checkpoints(self, name: str) -> list[dict[str, Any]]:
        check_workload_name(name)
        infos = self.repo.checkpoints(name)
        if not infos and name not in self._workloads:
            self.get(name)  # unknown and nothing stored: say so
        return [
            {
                "id": i.id,
                "created": i.created.isoformat(),
                "size_bytes": i.size_bytes,
                "new_bytes": i.new_bytes,
                "frozen_seconds": i.metadata.get("dump_stats", {}).get("frozen_time"),
                "host": i.metadata.get("host"),
            }
            for i in infos
        ]

    # -- checkpoint --------------------------------------------------------------------

    def _scheduled_checkpoint(self, name: str) -> None:
        try:
            self.checkpoint(name, wait=False)
        except WorkloadBusy:
            log.info("scheduled checkpoint of %s skipped: another operation is running", name)
        except CheckpointerError as e:
            log.error("scheduled checkpoint of %s failed: %s", name, e)
        except Exception:
            log.exception("scheduled checkpoint of %s failed unexpectedly", name)

    def checkpoint(self, name: str, wait: bool = True) -> dict[str, Any]:
        w = self.get(name)
        with self._locked(w, wait):
            return self._checkpoint(w)

    def _checkpoint(self, w: Workload) -> dict[str, Any]:
        if not w.alive():
            raise WorkloadNotRunning(
                f"workload {w.name} is not running ({w.exit_status or w.state}); "
                f"`checkpointer restore {w.name}` brings back its latest checkpoint"
            )
        assert w.pid is not None
        t0 = time.monotonic()
        images = self._scratch(w.name, "dump", w.pid)
        try:
            try:
                stats = self.criu.dump(w.pid, images, w.dump_options(), w.name)
            except CriuError as e:
                w.last_error = str(e)
                self.metrics.checkpoint_failed(w.name, e.category)
                raise
            metadata = {
                **hostinfo.host_facts(),
                "criu_version": self._criu_ver(),
                "pid": w.pid,
                "dump_stats": stats.as_dict(),
                "spec": {"kind": w.kind, "command": w.command, "cwd": w.cwd, "criu": w.criu},
            }
            try:
                manifest = self.repo.commit(w.name, images, metadata)
            except (StorageError, OSError) as e:
                w.last_error = f"storing the checkpoint failed: {e}"
                self.metrics.checkpoint_failed(w.name, "storage")
                raise CheckpointFailed(f"checkpoint of {w.name}: {w.last_error}") from e
            if self.config.criu.keep_latest_image:
                self._keep_hot(w, images, manifest.id)
        finally:
            shutil.rmtree(images.parent, ignore_errors=True)
        w.last_checkpoint, w.last_checkpoint_at, w.last_error = manifest.id, time.time(), None
        duration = time.monotonic() - t0
        self.metrics.checkpoint_ok(w.name, duration, stats, manifest.size_bytes, manifest.new_bytes)
        log.info(
            "checkpoint %s of %s: %d bytes, %d new (stored), frozen %.3fs, total %.2fs",
            manifest.id,
            w.name,
            manifest.size_bytes,
            manifest.new_bytes,
            stats.frozen_time,
            duration,
        )
        self._apply_retention(w)
        self._shed_spool()
        self.save()
        return {
            "workload": w.name,
            "id": manifest.id,
            "size_bytes": manifest.size_bytes,
            "new_bytes": manifest.new_bytes,
            "duration_seconds": round(duration, 3),
            "dump_stats": stats.as_dict(),
        }

    def _apply_retention(self, w: Workload, dry_run: bool = False) -> list[dict[str, Any]]:
        """Decide keep/remove for every checkpoint of `w` and remove (unless dry_run)."""
        infos = self.repo.checkpoints(w.name)
        good = [i.id for i in infos if i.id not in w.bad_checkpoints]
        verdicts = retention.decide(
            retention.RetentionPolicy(**w.retention),
            [retention.Item(i.id, i.created, i.size_bytes) for i in infos],
            pinned=frozenset(self.repo.pins(w.name)),
            protected=frozenset(good[:1]),
        )
        rows = []
        for v in verdicts:
            rows.append(
                {
                    "workload": w.name,
                    "id": v.id,
                    "created": v.created.isoformat(),
                    "action": "keep" if v.keep else "remove",
                    "reasons": v.reasons or ["no rule keeps it"],
                }
            )
            if v.keep or dry_run:
                continue
            try:
                self.repo.delete(w.name, v.id)
                self.retention_deleted += 1
                self.metrics.retention_deleted.labels(w.name).inc()
                log.info("retention: removed checkpoint %s of %s", v.id, w.name)
            except StorageError as e:
                log.warning("retention: cannot remove %s of %s: %s", v.id, w.name, e)
        return rows

    def _shed_spool(self) -> None:
        """The backend is down and the spool is full: drop the oldest checkpoints not uploaded."""
        spool, limit = self.spool, self.config.storage.spool_max_bytes
        if spool is None or spool.backlog_bytes() <= limit:
            return
        dropped = self.repo.shed(spool.pending_keys(), spool.discard, spool.backlog_bytes, limit)
        self.spool_dropped += len(dropped)
        self.metrics.spool_dropped.inc(len(dropped))
        log.error(
            "spool over %d bytes while the backend is unreachable: dropped %d checkpoint(s) "
            "never uploaded: %s",
            limit,
            len(dropped),
            ", ".join(dropped) or "none",
        )

    def collect_garbage(self) -> None:
        try:
            report = self.repo.gc()
            self.metrics.gc_deleted_packs.inc(len(report.deleted_packs))
            if report.deleted_packs:
                log.info("gc: removed %d unreferenced pack(s)", len(report.deleted_packs))
        except StorageError as e:
            log.warning("gc failed: %s", e)

    def prune(self, name: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Apply retention now (one workload or all), then collect unreferenced packs."""
        names = [name] if name else sorted(set(self._workloads) | set(self.repo.workloads()))
        rows: list[dict[str, Any]] = []
        for n in names:
            w = self._workloads.get(n)
            if w is None:
                check_workload_name(n)
                if not self.repo.checkpoints(n):
                    self.get(n)  # unknown here and nothing stored: the clear error
                w = Workload(
                    name=n,
                    kind="adopted",
                    retention=self.config.retention.model_dump(exclude_none=True),
                )
                rows += self._apply_retention(w, dry_run)
                continue
            with self._locked(w, wait=True):
                rows += self._apply_retention(w, dry_run)
        report = self.repo.gc(dry_run=dry_run)
        return {
            "dry_run": dry_run,
            "checkpoints": rows,
            "gc": {
                "deleted_packs": len(report.deleted_packs),
                "kept_young_unreferenced": report.kept_young,
                "referenced_packs": report.referenced_packs,
            },
        }

    def verify(
        self,
        name: str,
        checkpoint_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Re-hash every chunk of one checkpoint (default: the newest) from the repository."""
        check_workload_name(name)
        if checkpoint_id is None:
            infos = self.repo.checkpoints(name)
            if not infos:
                self.get(name)
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

    def pin(self, name: str, checkpoint_id: str, unpin: bool = False) -> dict[str, Any]:
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
    ) -> dict[str, Any]:
        """Restore a workload that is not running (registered here, or known to the repository)."""
        w = self._workloads.get(name) or self._workload_from_repository(name, checkpoint_id)
        with self._locked(w, wait=True):
            if w.alive():
                raise WorkloadRunning(
                    f"workload {name} is running (pid {w.pid}); `checkpointer rollback {name}` "
                    "replaces it with a checkpoint, or stop it first"
                )
            result = self._restore(w, checkpoint_id, reason="manual", progress=progress)
            w.streak = {}
            w.record("manual", "ok", f"restored as pid {w.pid}", result["checkpoint"])
            self.save()
            return result

    def rollback(self, name: str, to: str | None = None, back: int | None = None) -> dict[str, Any]:
        """Stop the running tree and restore an older checkpoint (`to` an id, or `back` N)."""
        w = self.get(name)
        with self._locked(w, wait=True):
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
            # Materialise before stopping anything: a damaged checkpoint leaves the tree running.
            images = self._scratch(name, "restore")
            t0 = time.monotonic()
            try:
                self._materialize(w, to, images)
                if w.alive():
                    self._teardown(w)
                result = self._criu_restore(w, to, images, reason="rollback")
            except (CriuError, RestoreFailed):
                self.metrics.restore_done(name, "rollback", ok=False)
                raise
            finally:
                shutil.rmtree(images.parent, ignore_errors=True)
            self.metrics.restore_done(
                name, "rollback", True, time.monotonic() - t0, result.pop("_stats")
            )
            w.record("rollback", "ok", f"restored as pid {w.pid}", to)
            return result

    def _restore(
        self,
        w: Workload,
        checkpoint_id: str | None,
        reason: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        if checkpoint_id is None:
            infos = self.repo.checkpoints(w.name)
            if not infos:
                raise CheckpointNotFound(
                    f"workload {w.name} has no checkpoint to restore; "
                    f"take one with `checkpointer checkpoint {w.name}`"
                )
            checkpoint_id = infos[0].id
        t0 = time.monotonic()
        hot = self._hot_image(w, checkpoint_id)
        images = hot or self._scratch(w.name, "restore")
        try:
            if hot is None:
                self._materialize(w, checkpoint_id, images, progress)
            result = self._criu_restore(w, checkpoint_id, images, reason)
            result["source"] = "kept image" if hot else "repository"
        except (CriuError, RestoreFailed, CheckpointNotFound):
            self.metrics.restore_done(w.name, reason, ok=False)
            raise
        finally:
            if hot is None:
                shutil.rmtree(images.parent, ignore_errors=True)
        self.metrics.restore_done(w.name, reason, True, time.monotonic() - t0, result.pop("_stats"))
        return result

    def _keep_hot(self, w: Workload, images: Path, checkpoint_id: str) -> None:
        """Keep the image just stored, in place of the previous one: restoring the newest
        checkpoint then needs no download and no decompression, only a check of the files."""
        hot_root = images.parent.parent / "hot"
        hot_root.mkdir(mode=0o700, exist_ok=True)
        hot, new = hot_root / w.name, hot_root / f".{w.name}.new"
        shutil.rmtree(new, ignore_errors=True)
        os.rename(images, new)
        self._drop_hot(w)
        shutil.rmtree(hot, ignore_errors=True)  # left by an earlier registration of the name
        os.rename(new, hot)
        w.hot_image = {"id": checkpoint_id, "path": str(hot), "stamp": kept_image.stamp(hot)}

    def _drop_hot(self, w: Workload) -> None:
        if w.hot_image.get("path"):
            shutil.rmtree(w.hot_image["path"], ignore_errors=True)
        w.hot_image = {}

    def _hot_image(self, w: Workload, checkpoint_id: str) -> Path | None:
        """The kept image of `checkpoint_id`, if there is one and it matches the manifest."""
        if w.hot_image.get("id") != checkpoint_id:
            return None
        path = Path(w.hot_image["path"])
        if kept_image.unchanged(path, w.hot_image.get("stamp", {})):
            return path
        log.warning(
            "kept image of %s does not match checkpoint %s: restoring from the repository",
            w.name,
            checkpoint_id,
        )
        self._drop_hot(w)
        return None

    def _materialize(
        self,
        w: Workload,
        checkpoint_id: str,
        images: Path,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        step = None
        if progress:
            total = self.repo.info(w.name, checkpoint_id).size_bytes
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                progress(done, total)

        seed = self._seed(w)
        try:
            try:
                self.repo.materialize(w.name, checkpoint_id, images, step, seed)
            except OSError as e:
                if seed is None:
                    raise
                log.warning("kept image of %s unusable (%s): fetching every chunk", w.name, e)
                done = 0
                self.repo.materialize(w.name, checkpoint_id, images, step)
        except CheckpointNotFound:
            raise
        except (StorageError, OSError) as e:
            w.last_error = str(e)
            raise RestoreFailed(f"cannot restore {w.name}: {e}") from e

    def _seed(self, w: Workload) -> tuple[str, Path] | None:
        """The kept image of the newest checkpoint, when it still matches: an older checkpoint
        (rollback) shares most pages with it, which are then copied, not fetched."""
        checkpoint_id = w.hot_image.get("id")
        path = self._hot_image(w, checkpoint_id) if checkpoint_id else None
        if not (checkpoint_id and path):
            return None
        log.info(
            "pages %s shares with kept checkpoint %s are copied from it", w.name, checkpoint_id
        )
        return checkpoint_id, path

    def _criu_restore(
        self, w: Workload, checkpoint_id: str, images: Path, reason: str
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        if w.kind == "managed":
            ensure_fifo(self.fifo(w.name))
            self.pump.attach(w.name, self.fifo(w.name), self.log_file(w.name))
        try:
            pid, stats = self.criu.restore(images, w.dump_options(), w.name)
        except CriuError as e:
            w.last_error = str(e)
            self.save()
            raise
        w.pid, w.started = pid, process.start_time(pid)
        w.state, w.exit_status, w.last_error, w.failed_reason = "running", None, None, None
        self.save()
        self.on_new_pid(w)
        duration = time.monotonic() - t0
        log.info(
            "restored %s from %s (%s): pid %d in %.2fs",
            w.name,
            checkpoint_id,
            reason,
            pid,
            duration,
        )
        return {
            "workload": w.name,
            "checkpoint": checkpoint_id,
            "pid": pid,
            "reason": reason,
            "duration_seconds": round(duration, 3),
            "restore_stats": stats.as_dict(),
            "_stats": stats,
        }

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
            kind=spec.get("kind", "adopted"),
            command=spec.get("command"),
            cwd=spec.get("cwd"),
            criu=spec.get("criu", {}),
        )
        self._add(w)
        return w

    # -- process lifecycle -------------------------------------------------------------

    def _teardown(self, w: Workload) -> None:
        assert w.pid is not None
        w.state = "stopping"  # its death is ours: the supervisor must not restore it
        left = process.teardown(w.pid, w.started)
        if left:
            raise CheckpointerError(
                f"workload {w.name}: processes {left} did not go away after SIGKILL; "
                "they may be stuck in the kernel (state D); check `ps -o pid,stat,cmd -p ...`"
            )
        w.state, w.exit_status = "stopped", "stopped by checkpointer"
        self.save()

    def mark_dead(self, pid: int, status: int | None) -> Workload | None:
        """Record that a workload's root died (status None: not our child, status unknown).

        Returns the workload if this death is news: it was running and nobody stopped it.
        """
        with self._registry_lock:
            w = next(
                (x for x in self._workloads.values() if x.pid == pid and x.state == "running"), None
            )
            if w is None:
                return None
            if status is None:
                w.state, w.exit_status = "crashed", "exited (status unknown: not our child)"
            else:
                w.state = "exited" if status == 0 else "crashed"
                w.exit_status = describe_exit(status)
        log.warning("workload %s (pid %d) %s", w.name, pid, w.exit_status)
        self.save()
        return w

    def workloads(self) -> list[Workload]:
        return list(self._workloads.values())

    def auto_restore(self, name: str, reason: str) -> None:
        """Bring a dead workload back by its restore policy (called by the supervisor).

        Tries the good checkpoints the policy's plan names, newest first, marking each that
        fails to restore as bad; then a cold start of a managed workload; then gives up.
        """
        w = self._workloads.get(name)
        if w is None:
            return
        with self._locked(w, wait=True):
            if w.alive() or w.state not in ("crashed", "exited", "restoring"):
                return  # restored by hand, stopped or unregistered meanwhile
            policy = w.policy()
            good = [c.id for c in self.repo.checkpoints(name) if c.id not in w.bad_checkpoints]
            depth = int(w.streak.get("depth", 0))
            steps = plan(policy, good, depth, w.kind == "managed")
            for cid in steps.checkpoints:
                try:
                    self._restore(w, cid, reason)
                except (CriuError, RestoreFailed, CheckpointNotFound) as e:
                    w.bad_checkpoints = [*w.bad_checkpoints, cid][-100:]
                    w.record(reason, "failed", f"{e}; marked bad, trying the one before", cid)
                    self.save()
                    continue
                w.record(reason, "ok", f"restored as pid {w.pid}", cid)
                self._restored(w)
                return
            if steps.cold_start:
                try:
                    self._start(w)
                except CheckpointerError as e:
                    w.record(reason, "failed", f"cold start failed: {e}")
                    self.metrics.restore_done(w.name, reason, ok=False)
                else:
                    self.metrics.restore_done(w.name, reason, ok=True)
                    w.record(
                        reason,
                        "ok",
                        f"no usable checkpoint left ({len(good)} good, "
                        f"depth {depth}): cold-started from its command as pid {w.pid}",
                    )
                    self._restored(w)
                    return
            self.fail(
                w,
                f"no checkpoint left to restore ({len(good)} good, stepped back "
                f"{depth}, max_depth {policy.max_depth})"
                + ("" if w.kind == "managed" else "; adopted workloads cannot cold-start"),
            )

    def _restored(self, w: Workload) -> None:
        w.streak = {**w.streak, "last_restore_at": time.time()}
        self.save()

    def fail(self, w: Workload, why: str) -> None:
        w.state, w.failed_reason = "failed", why
        log.error(
            "workload %s failed: %s; fix the cause, then `checkpointer restore %s`",
            w.name,
            why,
            w.name,
        )
        self.save()

    def stop_managed(self) -> None:
        """Stop every managed tree (they stay registered, as `stopped`: nothing restores them)."""
        for w in self.workloads():
            if w.kind == "managed" and w.alive():
                with self._locked(w, wait=True):
                    self._teardown(w)
                    log.info("workload %s stopped with the daemon", w.name)

    def stop_all_schedules(self) -> None:
        self.scheduler.shutdown()

    def status_names(self) -> set[str]:
        return set(self._workloads)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for operations in flight to finish (shutdown): take and drop every lock."""
        for w in list(self._workloads.values()):
            if w.lock.acquire(timeout=timeout):
                w.lock.release()

    # -- helpers -----------------------------------------------------------------------

    def _locked(self, w: Workload, wait: bool) -> _Held:
        return _Held(w, wait)

    def _criu_ver(self) -> str:
        if self._criu_version is None:
            self._criu_version = self.criu.version()
        return self._criu_version

    def _scratch(self, name: str, op: str, pid: int | None = None) -> Path:
        """A fresh 0700 folder for images; on tmpfs when it has room (the pause is shorter)."""
        root = self.config.criu.scratch_dir or self._auto_scratch_root(pid)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        work = root / f"{name}-{op}-{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        images = work / "images"
        images.mkdir(mode=0o700)
        return images

    def _auto_scratch_root(self, pid: int | None) -> Path:
        shm = Path("/dev/shm")
        if pid is not None and shm.is_dir():
            need = 2 * _tree_rss(pid) + 64 * 1024 * 1024
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize > need:
                return tmpfs_scratch_root(self.state_dir)
        return self.state_dir / "scratch"


class _Held:
    """The workload's lock as a context manager; refuses at once or waits, as asked."""

    def __init__(self, w: Workload, wait: bool) -> None:
        self.w, self.wait = w, wait

    def __enter__(self) -> None:
        ok = (
            self.w.lock.acquire(timeout=MANUAL_LOCK_TIMEOUT)
            if self.wait
            else self.w.lock.acquire(blocking=False)
        )
        if not ok:
            raise WorkloadBusy(
                f"workload {self.w.name} is busy with another checkpoint, restore "
                "or rollback; try again when it has finished"
            )

    def __exit__(self, *exc: object) -> None:
        self.w.lock.release()


def tmpfs_scratch_root(state_dir: Path) -> Path:
    """The daemon's folder in /dev/shm, named after its state folder: two daemons on one host
    (or in tests) never share scratch or kept images."""
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/dev/shm") / f"checkpointer-{tag}"


def _tree_rss(pid: int) -> int:
    total = 0
    for p in [pid, *process.descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
