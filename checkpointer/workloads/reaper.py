"""The daemon as child subreaper: orphans and restored trees become its children; it reaps them.

Without this, PID 1 of these hosts reaps late and a dead workload's PIDs stay taken by zombies,
which makes a restore of those PIDs fail. The reaper also tells the engine, at once, which
processes exited and how.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from checkpointer import children

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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def start(self) -> None:
        become_subreaper()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, lambda *_: self._wake.set())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # SIGCHLD wakes us at once; the timeout is a safety net for a lost signal.
            self._wake.wait(0.5)
            self._wake.clear()
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
