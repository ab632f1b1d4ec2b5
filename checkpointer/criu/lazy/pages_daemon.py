"""The `criu lazy-pages` process of one lazy restore: it receives the restored tree's
userfaultfds and asks our page server for every page still missing.

Started on the restore folder before the other images are there (it reads only the inventory
and the process tree before the restore connects to it), then waited for until it listens.
Its log is kept, as CRIU's logs are, when it fails; removed when it ends cleanly.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from pathlib import Path

from checkpointer import children
from checkpointer.criu.driver import Criu
from checkpointer.criu.failures import CriuError, classify


class LazyPagesDaemon:
    """One `criu lazy-pages`, a child of ours until `reap`, `end` or `stop` collects it."""

    def __init__(self, criu: Criu, images_dir: Path, label: str, peer: socket.socket) -> None:
        """Spawn it (only: `await_ready` waits until it listens). `peer` is its end of the page
        server's connection, closed here: its death must reach the server as EOF."""
        self.criu = criu
        self.label = label
        base = images_dir.parent / images_dir.name
        self.log = Path(f"{base}.lazy-pages.log")
        self._stderr = Path(f"{base}.lazy-pages.stderr")
        self._spawned_at = time.monotonic()
        self._ready_r = -1  # its readiness pipe, until `await_ready`
        try:
            exe = criu.exe()
            (images_dir / "lazy-pages.socket").unlink(missing_ok=True)
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            cmd = [
                *(exe, "lazy-pages", "--images-dir", str(images_dir)),
                *("--page-server", "--ps-socket", str(peer.fileno())),
                *("--status-fd", str(ready_w), "--log-file", str(self.log), "-v4"),
            ]
            try:
                with open(self._stderr, "wb") as err:
                    self.proc = children.spawn(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err.fileno(),
                        pass_fds=(peer.fileno(), ready_w),
                        start_new_session=True,  # a terminal's Ctrl-C must not end it first
                    )
            except BaseException:
                os.close(ready_r)
                self._stderr.unlink(missing_ok=True)
                raise
            finally:
                os.close(ready_w)
        finally:
            peer.close()  # the daemon's end is the daemon's
        self._ready_r = ready_r

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def await_ready(self, timeout: float) -> float:
        """Wait until it listens; return the seconds since it was spawned. Raises CriuError,
        classified from its log (kept), if it exited or did not answer within `timeout`."""
        ready_r, self._ready_r = self._ready_r, -1
        try:
            ready, _, _ = select.select([ready_r], [], [], timeout)
            got = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
        if got != b"\0":
            raise self._error("did not start" if ready else "did not start in time")
        return time.monotonic() - self._spawned_at

    def failure(self, rc: int) -> str:
        """Why it exited with status `rc`, from its log."""
        _, first, _ = classify(_read(self.log))
        return f"criu lazy-pages exited with status {rc}: {first}"

    def end(self) -> None:
        """It exited 0 (every page delivered): collect it and remove its log."""
        children.reap(self.proc, kill=False)
        self.log.unlink(missing_ok=True)
        self._stderr.unlink(missing_ok=True)

    def stop(self) -> Path | None:
        """SIGKILL it if it still runs, collect it, and keep its log (the restore failed or
        did not start); the kept log's path, if it wrote one."""
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
        children.reap(self.proc, kill=True)
        kept = self.criu.keep_log(self.log, self.label, "lazy-pages") if self.log.exists() else None
        self._stderr.unlink(missing_ok=True)
        return kept

    def _error(self, what: str) -> CriuError:
        rc = children.reap(self.proc, kill=True)
        text = _read(self.log) + "\n" + _read(self._stderr)
        category, first, advice = classify(text)
        kept = self.criu.keep_log(self.log, self.label, "lazy-pages")
        return CriuError(
            f"criu lazy-pages for {self.label} {what} (status {rc}): {first}; {advice}",
            category,
            kept,
        )


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""
