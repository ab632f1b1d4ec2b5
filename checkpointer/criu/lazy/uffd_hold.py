"""Copies of a process's userfaultfds: what keeps a lazily restored tree off zero pages.

Its own module, importing only the standard library, because the lazy restore's guard
(checkpointer.criu.lazy.guard) imports it in a process that must start fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading

SYS_PIDFD_GETFD = 438  # the same number on every architecture (unified syscall table)
_UFFD_LINK = "anon_inode:[userfaultfd]"


_LIBC = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy (close-on-exec) of descriptor `fd` of the process behind `pidfd`."""
    copy = int(_LIBC.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    if copy < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd of fd {fd}: {os.strerror(err)}")
    return copy


class UffdHold:
    """Copies of a process's userfaultfds, so that its death does not unregister the ranges
    (the restored tree then blocks on a missing page instead of reading zeroes).

    `refresh` copies the ones not held yet: `criu lazy-pages` gets a new userfaultfd for every
    fork inside the tree (UFFD_EVENT_FORK) and closes one when its process is gone, so a
    descriptor number comes back for another userfaultfd. Each is therefore known by its
    inode (every userfaultfd has its own, since Linux 5.12), never by its number, and a copy
    is kept only if it is the very file that was looked at."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._held: dict[int, int] = {}  # inode -> our copy
        self._lock = threading.Lock()

    def refresh(self) -> int:
        """Copy new userfaultfds; return how many are held. Quiet if the process is gone."""
        with self._lock:
            if self._pidfd < 0:
                return 0
            for fd, inode in self._userfaultfds():
                if inode not in self._held:
                    self._copy(fd, inode)
            return len(self._held)

    def _copy(self, fd: int, inode: int) -> None:
        try:
            copy = pidfd_getfd(self._pidfd, fd)
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EBADF):  # exited, or the fd closed meanwhile
                return
            raise OSError(e.errno, f"{e.strerror} of process {self.pid}") from e
        # The number may have been closed and reused between the look and the copy: keep the
        # copy under what it is (close-on-exec, as pidfd_getfd makes every copy).
        st = os.fstat(copy)
        if st.st_ino == inode or (
            os.readlink(f"/proc/self/fd/{copy}") == _UFFD_LINK and st.st_ino not in self._held
        ):
            self._held[st.st_ino] = copy
        else:
            os.close(copy)

    def _userfaultfds(self) -> list[tuple[int, int]]:
        """(number, inode) of each of the process's userfaultfds."""
        out = []
        fd_dir = f"/proc/{self.pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError):
            return []
        for name in names:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{name}") == _UFFD_LINK:
                    out.append((int(name), os.stat(f"{fd_dir}/{name}").st_ino))
        return out

    def release(self) -> None:
        with self._lock:
            for copy in self._held.values():
                os.close(copy)
            self._held.clear()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
