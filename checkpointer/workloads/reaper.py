"""The daemon as child subreaper: orphans and restored trees become its children; it reaps them.

Without this, PID 1 of these hosts reaps late and a dead workload's PIDs stay taken by zombies,
which makes a restore of those PIDs fail. The reaper also tells the engine, at once, which
processes exited and how.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from checkpointer.host import children

PR_SET_CHILD_SUBREAPER = 36
ExitCallback = Callable[[int, int], None]  # (pid, wait status)


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _children() -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


class Reaper:
    """Reaps every child that `children.run` is not waiting for; calls `on_exit` for each."""

    def __init__(self, on_exit: ExitCallback) -> None:
        self.on_exit = on_exit
        # SIGCHLD wakes the thread through a pipe, not an Event: a handler runs between two
        # bytecodes of the main thread, inside the previous handler too, and Event.set takes
        # a lock; a burst of SIGCHLD (a killed tree of 60 processes) deadlocked the main
        # thread on it, and the reaper waiting for the same lock stopped reaping.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def start(self) -> None:
        become_subreaper()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, lambda *_: self._wake())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        while not self._stop.is_set():
            # SIGCHLD wakes us at once; the timeout is a safety net for a lost signal.
            select.select([self._wake_r], [], [], 0.5)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            for pid, status in self._reap():
                try:
                    self.on_exit(pid, status)
                except Exception:
                    import logging

                    logging.getLogger(__name__).exception("exit callback for pid %d failed", pid)

    def _reap(self) -> list[tuple[int, int]]:
        reaped = []
        with children.LOCK:
            for pid in _children():
                if pid in children.OWN:
                    continue
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if got:
                    reaped.append((got, status))
        return reaped
