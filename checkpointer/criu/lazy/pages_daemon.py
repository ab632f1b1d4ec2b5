"""The `criu lazy-pages` process of one lazy restore: it receives the restored tree's
userfaultfds and asks our page server for every page still missing. The lazy restore's guard
starts it and is its parent (checkpointer.criu.lazy.guard): whenever this daemon dies, the guard
ends it; started by the daemon, it was left waiting forever for a restore when the daemon
died before the guard was up.

Started on the restore folder before the other images are there (it reads only the inventory
and the process tree before the restore connects to it), then waited for until it listens.
Its log is kept, as CRIU's logs are, when it fails; removed when it ends cleanly.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from pathlib import Path

from checkpointer.criu.driver import Criu
from checkpointer.criu.failures import CriuError, CriuFailure, classify
from checkpointer.criu.lazy.guard_process import GuardProcess


class LazyPagesDaemon:
    """One `criu lazy-pages`, started by the lazy restore's `guard` (its parent: see
    checkpointer.criu.lazy.guard), which reports its PID and exit status here."""

    def __init__(
        self, criu: Criu, images_dir: Path, label: str, peer: socket.socket, connection: int
    ) -> None:
        """Have the guard spawn it (only: `await_ready` waits until it listens). `peer` is its
        end of the page server's connection, closed here: its death must reach the server as
        EOF. `connection`: the server's end, which the guard holds too."""
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
                    self.guard = GuardProcess(
                        cmd, (peer.fileno(), ready_w), err.fileno(), connection
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
        """Its PID (waits until the guard has started it). Raises CriuError if it did not."""
        return self._started()[0]

    def _started(self) -> tuple[int, int]:
        started = self.guard.lazy_pages(timeout=30.0)
        if started is None:
            rc = self.guard.exited()
            raise CriuError(
                f"criu lazy-pages for {self.label} did not start: its guard (pid "
                f"{self.guard.pid}) exited with status {rc} (the daemon's log says why)",
                CriuFailure.LAZY_GUARD_LOST,
                None,
            )
        return started

    def poll(self) -> int | None:
        """Its exit status once it exited (-N: killed by signal N); 255 if it exited and its
        guard is gone without telling."""
        rc = self.guard.lazy_pages_exit()
        if rc is None and self.guard.exited() is not None:
            started = self.guard.lazy_pages(timeout=0)
            if started is None or _exited(started[1]):
                return 255
        return rc

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
        """It exited 0 (every page delivered; the guard collected it): remove its log."""
        self.guard.close()
        self.log.unlink(missing_ok=True)
        self._stderr.unlink(missing_ok=True)

    def stop(self) -> Path | None:
        """SIGKILL it if it still runs, collect it, and keep its log (the restore failed or
        did not start); the kept log's path, if it wrote one."""
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
        self._kill()
        self.guard.close()
        kept = self.criu.keep_log(self.log, self.label, "lazy-pages") if self.log.exists() else None
        self._stderr.unlink(missing_ok=True)
        return kept

    def _kill(self) -> int | None:
        """SIGKILL it and wait (10 s at most) until it is gone; its exit status if known."""
        with contextlib.suppress(CriuError):
            _, pidfd = self._started()
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 10.0)  # readable once it exited
        deadline = time.monotonic() + 1.0  # its guard reports the status right after
        while (rc := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return rc

    def _error(self, what: str) -> CriuError:
        rc = self._kill()
        text = _read(self.log) + "\n" + _read(self._stderr)
        category, first, advice = classify(text)
        kept = self.criu.keep_log(self.log, self.label, "lazy-pages")
        return CriuError(
            f"criu lazy-pages for {self.label} {what} (status {rc}): {first}; {advice}",
            category,
            kept,
        )


def _exited(pidfd: int) -> bool:
    ready, _, _ = select.select([pidfd], [], [], 0)
    return bool(ready)


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""
