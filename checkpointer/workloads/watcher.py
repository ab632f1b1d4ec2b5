"""Learn at once that a process which is not our child has exited, through a pidfd.

The reaper tells us about our own children (managed trees, restored trees). Adopted trees, and
trees a previous daemon started, have another parent; their pidfd becomes readable the moment
they exit. No polling of /proc every N seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class ExitWatcher:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # fd -> pid
        self._poll = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="exit-watcher", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.on_exit(pid)
            return
        with self._lock:
            self._fds[fd] = pid
            self._poll.register(fd, select.POLLIN)
        os.write(self._wake_w, b"x")

    def unwatch(self, pid: int) -> None:
        with self._lock:
            for fd, p in list(self._fds.items()):
                if p == pid:
                    self._poll.unregister(fd)
                    del self._fds[fd]
                    os.close(fd)

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop:
            events = self._poll.poll(1000)
            for fd, _ in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    pid = self._fds.pop(fd, None)
                    if pid is None:
                        continue
                    self._poll.unregister(fd)
                    os.close(fd)
                try:
                    self.on_exit(pid)
                except Exception:
                    log.exception("exit callback for pid %d failed", pid)
