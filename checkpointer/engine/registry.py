"""The registered workloads, and the one place that writes `workloads.json`.

A restarted daemon re-adopts or restores what the file lists, so losing it loses every
automatic restore. Writes are serialised (one lock held from the snapshot to the rename: two
threads saving at once gave hundreds of FileNotFoundError on a shared temp name), go to a
unique temp file, are fsynced and renamed over the old file, whose previous content is kept as
`workloads.json.prev`: a file damaged on disk falls back to the one before, and a registry that
cannot be read at all stops the daemon with a message instead of starting empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from checkpointer.config import CriuOptions, DrillPolicy, RestorePolicy, Retention
from checkpointer.engine.disk_images import DiskImage
from checkpointer.engine.kept_image import KeptImage
from checkpointer.engine.policy import Streak
from checkpointer.engine.spec import options_json
from checkpointer.engine.workload import (
    DrillRecord,
    DrillResult,
    RestoreAttempt,
    RestoreResult,
    Workload,
    WorkloadKind,
    WorkloadState,
)
from checkpointer.errors import CheckpointerError, WorkloadExists, WorkloadNotFound
from checkpointer.host import info as hostinfo

log = logging.getLogger(__name__)


class RegistryUnreadable(CheckpointerError):
    kind = "registry"


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous = path.with_name(path.name + ".prev")
        self._workloads: dict[str, Workload] = {}
        self._lock = threading.Lock()  # the dict
        self._write_lock = threading.Lock()  # the file
        self.previous_boot_id: str | None = None

    def get(self, name: str) -> Workload:
        w = self._workloads.get(name)
        if w is None:
            raise WorkloadNotFound.named(name, list(self._workloads))
        return w

    def find(self, name: str) -> Workload | None:
        return self._workloads.get(name)

    def names(self) -> set[str]:
        return set(self._workloads)

    def all(self) -> list[Workload]:
        return sorted(self._workloads.values(), key=lambda w: w.name)

    def running_with_pid(self, pid: int) -> Workload | None:
        with self._lock:
            return next(
                (
                    w
                    for w in self._workloads.values()
                    if w.pid == pid and w.state is WorkloadState.RUNNING
                ),
                None,
            )

    def add(self, w: Workload) -> None:
        with self._lock:
            if w.name in self._workloads:
                raise WorkloadExists.named(w.name)
            self._workloads[w.name] = w
        self.save()

    def remove(self, name: str) -> None:
        with self._lock:
            self._workloads.pop(name, None)
        self.save()

    def save(self) -> None:
        """Write the registry atomically and durably; safe from any thread."""
        with self._write_lock:
            with self._lock:
                doc = {
                    "boot_id": hostinfo.boot_id(),
                    "workloads": [to_json(w) for w in self._workloads.values()],
                }
            data = json.dumps(doc, indent=1).encode()
            fd, tmp = tempfile.mkstemp(prefix=".workloads-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                # The old file stays in place until the rename: readers never find none.
                keep = self.path.with_name(".workloads.prev.tmp")
                with contextlib.suppress(FileNotFoundError):
                    keep.unlink()
                with contextlib.suppress(FileNotFoundError):
                    os.link(self.path, keep)
                    os.replace(keep, self.previous)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

    def load(self) -> list[Workload]:
        """Read what a previous daemon registered (the file, else the one before it)."""
        errors = []
        for path in (self.path, self.previous):
            try:
                doc = json.loads(path.read_bytes())
                workloads = [from_json(item) for item in doc.get("workloads", [])]
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError, KeyError, ValidationError) as e:
                errors.append(f"{path}: {e}")
                continue
            if path == self.previous:
                log.error("cannot read %s: using the previous copy %s", self.path, path)
            self.previous_boot_id = doc.get("boot_id")
            with self._lock:
                self._workloads = {w.name: w for w in workloads}
            return workloads
        if errors:
            raise RegistryUnreadable(
                "cannot read the workload registry ("
                + "; ".join(errors)
                + f"); move {self.path} aside to start with no registered workloads "
                "(their checkpoints stay in the repository: `checkpointer restore NAME`)"
            )
        return []


def to_json(w: Workload) -> dict[str, Any]:
    return {
        "name": w.name,
        "kind": str(w.kind),
        "command": w.command,
        "cwd": w.cwd,
        **options_json(w),  # the same list a checkpoint carries (spec.py)
        "pid": w.pid,
        "started": w.started,
        "state": str(w.state),
        "exit_status": w.exit_status,
        "last_checkpoint": w.last_checkpoint,
        "last_checkpoint_at": w.last_checkpoint_at,
        "last_error": w.last_error,
        "failed_reason": w.failed_reason,
        "streak": asdict(w.streak),
        "bad_checkpoints": w.bad_checkpoints,
        "hot_image": (
            {"id": w.kept.id, "path": str(w.kept.path), "stamp": w.kept.stamp} if w.kept else {}
        ),
        "disk_images": [d.as_json() for d in w.disk],
        "history": [{**asdict(a), "result": str(a.result)} for a in w.history],
        "drills": [{**asdict(d), "result": str(d.result)} for d in w.drills],
        "owner": w.owner,
        "container": w.container,
    }


def from_json(d: dict[str, Any]) -> Workload:
    hot = d.get("hot_image") or {}
    return Workload(
        name=d["name"],
        kind=WorkloadKind(d["kind"]),
        command=d.get("command"),
        cwd=d.get("cwd"),
        env=dict(d.get("env") or {}),
        every=d.get("every"),
        cron=d.get("cron"),
        jitter=d.get("jitter"),
        criu=CriuOptions.model_validate(d.get("criu") or {}),
        retention=Retention.model_validate(d.get("retention") or {"keep_last": 10}),
        restore=RestorePolicy.model_validate(d.get("restore") or {}),
        drill=DrillPolicy.model_validate(d.get("drill") or {}),
        pid=d.get("pid"),
        started=d.get("started"),
        state=WorkloadState(d.get("state", "stopped")),
        exit_status=d.get("exit_status"),
        last_checkpoint=d.get("last_checkpoint"),
        last_checkpoint_at=d.get("last_checkpoint_at"),
        last_error=d.get("last_error"),
        failed_reason=d.get("failed_reason"),
        streak=Streak(**(d.get("streak") or {})),
        bad_checkpoints=list(d.get("bad_checkpoints") or []),
        kept=(
            KeptImage(hot["id"], Path(hot["path"]), hot.get("stamp") or {})
            if hot.get("id") and hot.get("path")
            else None
        ),
        disk=_disk_images(d.get("disk_images")),
        history=[
            RestoreAttempt(
                time=a["time"],
                reason=a["reason"],
                checkpoint=a.get("checkpoint"),
                result=RestoreResult(a["result"]),
                detail=a.get("detail", ""),
            )
            for a in d.get("history") or []
        ],
        drills=_drills(d.get("drills")),
        owner=d.get("owner"),
        container=d.get("container"),
    )


def _drills(raw: Any) -> list[DrillRecord]:
    """The drills a registry lists; one it cannot read is forgotten (the repository's marks
    still say what was verified), never a reason to refuse the registry."""
    out = []
    for d in raw or []:
        try:
            out.append(DrillRecord(**{**d, "result": DrillResult(d["result"])}))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("registry: a drill record is unreadable (%s): ignored", e)
    return out


def _disk_images(raw: Any) -> list[DiskImage]:
    """The disk slots a registry lists; one it cannot read is forgotten (its folder is
    overwritten by the next checkpoint), never a reason to refuse the registry."""
    out = []
    for d in raw or []:
        try:
            out.append(DiskImage.from_json(d))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("registry: a disk image record is unreadable (%s): ignored", e)
    return out
