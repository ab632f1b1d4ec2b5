"""Copies of a process's userfaultfds: what keeps a lazily restored tree off zero pages.

Its own module, importing only the standard library, because the lazy restore's guard
(checkpointer.lazy_guard) imports it in a process that must start fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path

SYS_PIDFD_GETFD = 438  # the same number on every architecture (unified syscall table)


class UffdHold:
    """Copies of a process's userfaultfds, so that its death does not unregister the ranges
    (the restored tree then blocks on a missing page instead of reading zeroes).

    `refresh` copies the ones not held yet: the daemon gets a new userfaultfd for every fork
    inside the tree (UFFD_EVENT_FORK). A descriptor number the daemon closed and reused is not
    copied again: a fork after a task's exit in the same tick can be missed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._held: dict[int, int] = {}  # daemon's fd number -> our copy
        self._lock = threading.Lock()
        self._libc = ctypes.CDLL(None, use_errno=True)

    def refresh(self) -> int:
        """Copy new userfaultfds; return how many are held. Quiet if the process is gone."""
        with self._lock:
            if self._pidfd < 0:
                return 0
            for fd in self._uffd_numbers():
                if fd in self._held:
                    continue
                copy = self._libc.syscall(SYS_PIDFD_GETFD, self._pidfd, fd, 0)
                if copy < 0:
                    err = ctypes.get_errno()
                    if err in (3, 9):  # ESRCH: exited; EBADF: fd closed meanwhile
                        continue
                    raise OSError(err, f"pidfd_getfd of criu lazy-pages' fd {fd}")
                self._held[fd] = copy  # close-on-exec, as pidfd_getfd makes every copy
            return len(self._held)

    def _uffd_numbers(self) -> list[int]:
        out = []
        fd_dir = Path(f"/proc/{self.pid}/fd")
        try:
            names = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError):
            return []
        for name in names:
            with contextlib.suppress(OSError):
                if os.readlink(fd_dir / name) == "anon_inode:[userfaultfd]":
                    out.append(int(name))
        return out

    def release(self) -> None:
        with self._lock:
            for copy in self._held.values():
                os.close(copy)
            self._held.clear()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
