"""The deadman: a small process beside the daemon that stops a workload's tree (SIGSTOP) at
its lease's deadline unless the daemon has moved the deadline on.

Why a process of its own: a pause of the daemon (SIGSTOP, a stop-the-world stall, a debugger)
pauses every thread of it, the fleet's watchdog too, but not the workloads, which are other
processes. Another host takes a lease over once it has seen it unchanged for TTL + skew; if
the daemon is paused past that, its copy would run beside the new owner's. The deadman is
not paused with the daemon, so it stops the copy on time. A pause of the whole machine pauses
it too: then the daemon's watchdog stops the copy the moment the machine runs again.

The daemon writes one line per change on the deadman's stdin:
    arm NAME PID STARTED DEADLINE   (DEADLINE: CLOCK_BOOTTIME seconds, as `boottime()`)
    disarm NAME
When stdin closes (the daemon stopped or died) the deadman keeps the deadlines it has (the
leases are not renewed any more: other hosts may take them over) and exits once every armed
tree is stopped or gone. A new daemon ends the previous deadman first (`Deadman.start`), then
resumes the trees whose leases it still holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from checkpointer.workloads import process

log = logging.getLogger(__name__)


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: the clock of every lease deadline (the fleet's `monotonic`,
    the deadman's). Like CLOCK_MONOTONIC it never jumps, but it keeps counting while the
    machine is suspended, which CLOCK_MONOTONIC does not: on that clock a host resumed after
    a suspend longer than its TTL would find its deadline not passed yet and let its copies
    run on beside the new owner's (other hosts counted the suspend: they took the leases)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class _Armed:
    pid: int
    started: int | None
    deadline: float


class Deadman:
    """The daemon's side: starts the deadman process and tells it each lease's deadline."""

    def __init__(self, state_dir: Path) -> None:
        self.pidfile = state_dir / "deadman.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._end_previous()
        # Not in children.OWN: the reaper collects it if it ever exits while we run.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "checkpointer.workloads.deadman"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # not in the daemon's process group: not signalled with it
            cwd="/",
        )
        self.pidfile.write_text(f"{self.proc.pid} {process.start_time(self.proc.pid)}\n")

    def _end_previous(self) -> None:
        """A deadman left by the previous daemon (same state folder) would stop trees at
        deadlines this daemon is about to move on."""
        try:
            pid_text, started_text = self.pidfile.read_text().split()
            pid, started = int(pid_text), int(started_text)
        except (OSError, ValueError):
            return
        if process.is_alive(pid, started) and _is_deadman(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while process.is_alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.01)

    def arm(self, name: str, pid: int, started: int | None, deadline: float) -> None:
        self._send(f"arm {name} {pid} {started if started is not None else '-'} {deadline!r}")

    def disarm(self, name: str) -> None:
        self._send(f"disarm {name}")

    def _send(self, line: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.error("the deadman process is gone: leases are watched by the daemon alone")
            self.proc = None

    def close(self) -> None:
        """The daemon stops: the deadman keeps the deadlines it has (module docstring)."""
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.proc = None


def _is_deadman(pid: int) -> bool:
    try:
        return b"checkpointer.workloads.deadman" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _parse(line: str, armed: dict[str, _Armed]) -> None:
    parts = line.split()
    if len(parts) == 5 and parts[0] == "arm":
        started = None if parts[3] == "-" else int(parts[3])
        armed[parts[1]] = _Armed(int(parts[2]), started, float(parts[4]))
    elif len(parts) == 2 and parts[0] == "disarm":
        armed.pop(parts[1], None)


def main() -> None:
    """The deadman process: stdin lines in, SIGSTOP at the deadlines."""
    armed: dict[str, _Armed] = {}
    buffered = b""
    open_ = True
    while open_ or armed:
        now = boottime()
        for name, a in list(armed.items()):
            if not process.is_alive(a.pid, a.started):
                del armed[name]
            elif now >= a.deadline:
                process.stop_tree(a.pid)
                print(
                    f"deadman: the lease of {name} was not renewed by its deadline: its tree "
                    f"(pid {a.pid}) is stopped",
                    file=sys.stderr,
                    flush=True,
                )
                del armed[name]
        if not open_:
            time.sleep(0.05)
            continue
        nearest = min((a.deadline for a in armed.values()), default=now + 1.0)
        ready, _, _ = select.select([0], [], [], max(0.0, min(nearest - now, 1.0)))
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            open_ = False
            continue
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            _parse(line.decode(errors="replace"), armed)


if __name__ == "__main__":
    main()
