"""Who may run a workload: this host alone (the default), or whichever host of the fleet
holds its lease (checkpointer/daemon/fleet.py). The engine asks before every checkpoint,
restore and start; it never talks to leases itself."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from checkpointer.engine.workload import Workload
from checkpointer.workloads import process
from checkpointer.workloads.deadman import Deadman
from storage.leases import Lease

log = logging.getLogger(__name__)


class Ownership(Protocol):
    def hold(self, name: str) -> int | None:
        """The lease generation to record in a checkpoint of `name` (None: no fleet).
        Raises NotOwner unless this host holds a lease it can still act on."""
        ...

    def claim(self, name: str) -> int | None:
        """Take (or keep) the lease before starting or restoring `name`. Raises NotOwner
        naming the host that owns it."""
        ...

    def release(self, name: str) -> None:
        """Give the lease up (unregistered here)."""
        ...

    def owner(self, name: str) -> str | None:
        """Which host owns `name`, as last seen (None: no fleet, or unknown)."""
        ...


class Fleet(Protocol):
    """What `migrate` needs of fleet mode (checkpointer/daemon/fleet.py)."""

    host: str

    def live_hosts(self) -> dict[str, float]: ...

    def hand_over(self, name: str, to: str) -> None: ...

    def lease(self, name: str) -> Lease | None: ...

    def prepare(self, name: str, to: str | None) -> None: ...

    def wait_prepared(self, name: str, to: str, timeout: float) -> str | None: ...

    def view(self) -> list[Lease]: ...


class SingleHost:
    """No fleet: this host owns every workload it knows."""

    def hold(self, name: str) -> int | None:
        return None

    def claim(self, name: str) -> int | None:
        return None

    def release(self, name: str) -> None:
        return None

    def owner(self, name: str) -> str | None:
        return None


class LocalCopies:
    """This host's copy of a workload, stopped and resumed by the fleet's lease watchdog the
    moment a lease reaches its deadline, without the workload's lock: the lock may be held
    for minutes by a checkpoint or a restore, and the deadline does not wait. SIGSTOP, not
    SIGKILL: if the lease turns out to be still ours (the bucket was only slow), the tree
    runs on with nothing lost; if another host took it, the engine's `fence` kills it (a
    stopped tree dies as well as a running one)."""

    def __init__(
        self, find: Callable[[str], Workload | None], deadman: Deadman | None = None
    ) -> None:
        self.find = find
        self.deadman = deadman

    def guard(self, name: str, deadline: float) -> None:
        """Have the deadman stop the tree at `deadline` (monotonic) unless moved on before:
        the daemon may be paused then (checkpointer/workloads/deadman.py)."""
        w = self.find(name)
        if self.deadman is not None and w is not None and w.pid is not None:
            self.deadman.arm(name, w.pid, w.started, deadline)

    def unguard(self, name: str) -> None:
        if self.deadman is not None:
            self.deadman.disarm(name)

    def freeze(self, name: str) -> bool:
        """Stop the tree of `name` if it runs here; True if it is now stopped for its lease
        (and so to be resumed if the lease proves ours). A tree found stopped already was
        stopped by the deadman (ours), or by an operation that holds the workload's lock (a
        migration's final dump: not ours to resume; asked again once the lock is free)."""
        w = self.find(name)
        if w is None or w.pid is None or not w.alive():
            return False
        if process.state(w.pid) in ("T", "t"):
            return not w.lock.locked()
        process.stop_tree(w.pid)
        log.warning("workload %s: stopped (SIGSTOP): its lease could not be kept", name)
        return True

    def thaw(self, name: str) -> None:
        """Resume the tree of `name` (its lease is ours again)."""
        w = self.find(name)
        if w is not None and w.pid is not None and w.alive():
            process.thaw(w.pid)
