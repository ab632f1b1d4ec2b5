"""A registered workload: its kind, options and what the daemon knows of its tree.

Typed here once; the registry alone turns it into JSON and back. Its kinds, states and the
results of its restores and drills are enums of engine/states.py, documented there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from checkpointer.config import CriuOptions, DrillPolicy, RestorePolicy, Retention
from checkpointer.criu import DumpOptions
from checkpointer.engine.disk_images import DiskImage
from checkpointer.engine.kept_image import KeptImage
from checkpointer.engine.policy import Streak
from checkpointer.engine.states import DrillResult as DrillResult
from checkpointer.engine.states import RestoreReason as RestoreReason
from checkpointer.engine.states import RestoreResult as RestoreResult
from checkpointer.engine.states import WorkloadKind as WorkloadKind
from checkpointer.engine.states import WorkloadState as WorkloadState
from checkpointer.workloads import process

log = logging.getLogger(__name__)

HISTORY = 20  # restore attempts kept per workload, for `status` and the log


@dataclass
class RestoreAttempt:
    time: float
    reason: str
    checkpoint: str | None
    result: RestoreResult
    detail: str


@dataclass
class DrillRecord:
    """One restore drill (checkpointer/engine/drills.py): `created` is its checkpoint's."""

    time: float
    checkpoint: str
    created: float
    result: DrillResult
    detail: str
    seconds: float


@dataclass
class LazyInFlight:
    """A lazy restore of `checkpoint` whose pages are still arriving (`restore`: its
    checkpointer.criu.lazy.LazyRestore)."""

    checkpoint: str
    restore: Any
    reading_slot: int | None = None
    """The disk image slot its pages are read from (after a reboot): no checkpoint may
    overwrite that slot until the transfer ends."""


@dataclass
class Workload:
    """A registered process tree and what the daemon knows of it. Persisted across restarts."""

    name: str
    kind: WorkloadKind
    command: list[str] | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    every: float | None = None
    cron: str | None = None
    jitter: float | None = None
    criu: CriuOptions = field(default_factory=CriuOptions)
    retention: Retention = field(default_factory=lambda: Retention(keep_last=10))
    restore: RestorePolicy = field(default_factory=RestorePolicy)
    drill: DrillPolicy = field(default_factory=DrillPolicy)
    pid: int | None = None
    started: int | None = None  # /proc start time of `pid`: tells a reused PID apart
    state: WorkloadState = WorkloadState.STOPPED
    exit_status: str | None = None
    last_checkpoint: str | None = None
    last_checkpoint_at: float | None = None
    last_error: str | None = None
    failed_reason: str | None = None
    streak: Streak = field(default_factory=Streak)
    bad_checkpoints: list[str] = field(default_factory=list)
    kept: KeptImage | None = None  # the newest image, kept in scratch
    disk: list[DiskImage] = field(default_factory=list)  # the newest images, kept on disk
    history: list[RestoreAttempt] = field(default_factory=list)  # newest last
    drills: list[DrillRecord] = field(default_factory=list)  # newest last
    owner: str | None = None  # fleet: the host that owns it, when that is not this one
    container: str | None = None  # lxc, podman: the container's name in its runtime
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # A lazy restore still fetching pages (not persisted: it ends with the daemon), and
    # whether the next restore must be a full one (the last lazy one failed).
    lazy: LazyInFlight | None = field(default=None, repr=False, compare=False)
    lazy_off: bool = field(default=False, repr=False, compare=False)

    @property
    def managed(self) -> bool:
        return self.kind is WorkloadKind.MANAGED

    def dump_options(self) -> DumpOptions:
        opts = self.criu.model_dump()
        opts["extra_options"] = tuple(opts["extra_options"])
        return DumpOptions(**opts)

    def alive(self) -> bool:
        return self.pid is not None and process.is_alive(self.pid, self.started)

    def restored_as(self, pid: int) -> None:
        """Record that the restored tree runs as `pid`. Its state turns `running` only once
        the restore is in its history (Recovery records it): `status` reads without the lock,
        and must never show the tree running while its last restore record is an older one."""
        self.pid, self.started, self.owner = pid, process.start_time(pid), None
        self.exit_status, self.last_error, self.failed_reason = None, None, None

    def mark_bad(self, checkpoint_id: str) -> None:
        self.bad_checkpoints = [*self.bad_checkpoints, checkpoint_id][-100:]

    def verified(self) -> DrillRecord | None:
        """The drill that verified the newest checkpoint still proven (not marked bad since)."""
        ok = [
            d
            for d in self.drills
            if d.result is DrillResult.VERIFIED and d.checkpoint not in self.bad_checkpoints
        ]
        return max(ok, key=lambda d: (d.created, d.time), default=None)

    def record_drill(self, drill: DrillRecord) -> None:
        """Keep the last HISTORY drills, and the newest verified one whatever came after."""
        verified = self.verified()
        kept = [*self.drills, drill][-HISTORY:]
        if verified is not None and verified not in kept:
            kept = [verified, *kept[1:]]
        self.drills = kept

    def record(
        self, reason: str, result: RestoreResult, detail: str, checkpoint: str | None = None
    ) -> None:
        """Keep the last HISTORY restore attempts, for `status` and the log."""
        self.history.append(RestoreAttempt(time.time(), reason, checkpoint, result, detail))
        del self.history[:-HISTORY]
        log.log(
            logging.INFO if result is RestoreResult.OK else logging.WARNING,
            "restore of %s (%s) from %s: %s: %s",
            self.name,
            reason,
            checkpoint or "its command",
            result,
            detail,
        )
