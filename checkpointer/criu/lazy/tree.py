"""The tree a lazy restore brought back, and how it is killed for sure.

A tree whose pages cannot come must be dead before the copies of its userfaultfds are let go:
the kernel would then fill every missing page with zeroes under a running tree. So it is
SIGKILLed again and again until nothing of it is left, and never by a PID alone: the root is
held by pidfd, each descendant by PID and start time, so a PID reused meanwhile is spared.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

from checkpointer.workloads.process import descendants, is_alive, start_time


class RestoredTree:
    """The restored root (`pid`) and the descendants seen while killing it. Not thread-safe:
    the lazy restore calls it under its own lock."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self._root: int | None = None  # pidfd of the restored root: never a reused PID
        self._killed: dict[int, int | None] = {}  # pid -> start time, for the same reason

    def adopt(self, pid: int) -> None:
        """The root CRIU restored (its pidfd is taken first: it may already be gone)."""
        with contextlib.suppress(ProcessLookupError):  # gone already: nothing left to kill
            self._root = os.pidfd_open(pid)
        self.pid = pid

    def kill(self) -> None:
        """SIGKILL the root (by pidfd) and every descendant seen so far (by PID and start
        time); again on every call, for processes forked meanwhile."""
        if self.pid is None:
            return
        if self._root is not None and _pidfd_alive(self._root):  # so self.pid is still it
            for p in descendants(self.pid):
                self._killed.setdefault(p, start_time(p))
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._root, signal.SIGKILL)
        for p, started in self._killed.items():
            if is_alive(p, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def dead(self) -> bool:
        """Neither the root nor any descendant `kill` has seen is still there."""
        root_alive = self._root is not None and _pidfd_alive(self._root)
        return not root_alive and not any(is_alive(p, t) for p, t in self._killed.items())

    def close(self) -> None:
        """Let the root's pidfd go (the tree is dead, or owns all its memory)."""
        if self._root is not None:
            os.close(self._root)
            self._root = None


def _pidfd_alive(pidfd: int) -> bool:
    """Whether the process has not exited yet (a pidfd polls readable once it has)."""
    ready, _, _ = select.select([pidfd], [], [], 0)
    return not ready
