"""Workload output: a FIFO per managed workload, drained by the daemon into a log file.

Why a FIFO and not an anonymous pipe: the workload's stdout/stderr is the FIFO, opened
read-write, so it always has a reader and never dies of SIGPIPE, even while the daemon is
down (it blocks when the 64 KiB buffer is full instead). A restarted daemon reopens the FIFO
by path and carries on. CRIU checkpoints the FIFO by path and reopens it on restore, so the
restored tree's output arrives in the same log with no fd passing.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import stat
import threading
from pathlib import Path

MAX_LOG_BYTES = 64 * 1024 * 1024


def ensure_fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if stat.S_ISFIFO(path.stat().st_mode):
            return
        path.unlink()
    except FileNotFoundError:
        pass
    os.mkfifo(path, 0o600)


def open_for_workload(path: Path) -> int:
    """The fd to hand the workload as stdout and stderr (read-write: see module doc)."""
    ensure_fifo(path)
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


class LogPump:
    """One thread copies every registered FIFO into its log file, rotating at MAX_LOG_BYTES."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._open: dict[str, tuple[int, Path]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="log-pump", daemon=True)
        self._thread.start()

    def attach(self, name: str, fifo: Path, log: Path) -> None:
        ensure_fifo(fifo)
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            if name in self._open:
                return
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._open[name] = (fd, log)
            self._sel.register(fd, selectors.EVENT_READ, name)
        os.write(self._wake_w, b"x")

    def detach(self, name: str) -> None:
        with self._lock:
            entry = self._open.pop(name, None)
            if entry:
                self._drain(entry[0], entry[1])
                self._sel.unregister(entry[0])
                os.close(entry[0])
        os.write(self._wake_w, b"x")

    def flush(self) -> None:
        """Copy whatever is buffered now (tests and shutdown use this)."""
        with self._lock:
            for fd, log in self._open.values():
                self._drain(fd, log)

    def close(self) -> None:
        self.flush()
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(timeout=1.0):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    entry = self._open.get(key.data)
                    if entry and entry[0] == key.fd:
                        self._drain(*entry)

    @staticmethod
    def _drain(fd: int, log: Path) -> None:
        data = bytearray()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        if not data:
            return
        with contextlib.suppress(FileNotFoundError):
            if log.stat().st_size > MAX_LOG_BYTES:
                os.replace(log, log.with_name(log.name + ".1"))
        fd_out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd_out, data)
        finally:
            os.close(fd_out)
