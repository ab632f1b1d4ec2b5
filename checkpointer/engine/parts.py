"""What the engine's services (Recovery, Migration, Registering, Reports) are given of the
engine: the workloads with their locks (`Workloads`, which the Engine is), the hooks to the
supervisor (`Hooks`) and the checkpoint schedule (`Schedule`). Interfaces only: a service
names what it uses, the daemon wires the parts (checkpointer/daemon/main.py), and no service
imports another or the Engine.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from datetime import datetime

    from checkpointer.config import WorkloadOptions
    from checkpointer.engine.workload import Workload


@dataclass(frozen=True)
class Hooks:
    """What the engine tells the supervisor: a tree has a new PID to watch; a tree is down and
    the restore policy should decide (a rollback that failed after stopping the tree); a tree
    handed to this host is to be restored now, whatever its crash policy says."""

    watch: Callable[[Workload], None] = lambda w: None
    down: Callable[[Workload, str], None] = lambda w, reason: None
    restore_soon: Callable[[Workload, str], None] = lambda w, reason: None


class Schedule(Protocol):
    """The checkpoint schedule (checkpointer/daemon/scheduler.py)."""

    def schedule(
        self, name: str, every: float | None, cron: str | None, jitter: float | None = None
    ) -> None: ...

    def unschedule(self, name: str) -> None: ...

    def next_run(self, name: str) -> datetime | None: ...


class Workloads(Protocol):
    """The registered workloads, one operation at a time on each (checkpointer/engine/facade.py
    is the one implementation). A service changes a workload only inside `locked`, then
    `save`s it."""

    def get(self, name: str) -> Workload:
        """The workload `name`, or WorkloadNotFound (the clear error for a user)."""
        ...

    def find(self, name: str) -> Workload | None: ...

    def workloads(self) -> list[Workload]: ...

    def locked(self, w: Workload, wait: bool) -> AbstractContextManager[None]:
        """The workload's lock: waits (up to 600 s) or refuses at once (WorkloadBusy)."""
        ...

    def save(self) -> None: ...

    def fail(self, w: Workload, why: str) -> None:
        """Give up on `w`: state failed, with why, until an operator restores it."""
        ...

    def add(self, w: Workload, options: WorkloadOptions) -> None: ...

    def forget(self, w: Workload) -> None: ...

    def scheduled(self, w: Workload) -> None:
        """Checkpoint `w` by its (new) schedule."""
        ...

    def unschedule(self, name: str) -> None: ...

    def update_options(self, name: str, options: WorkloadOptions) -> None: ...

    def drop_images(self, w: Workload) -> None:
        """Drop the kept and disk images of a workload no longer ours to restore."""
        ...

    def start(self, w: Workload) -> None:
        """Start a managed workload's command (a new tree, no state); lock held."""
        ...

    def teardown(self, w: Workload) -> None:
        """Stop the whole tree (TeardownFailed if some PID stays); lock held."""
        ...
