"""Children the daemon waits for itself, kept apart from the orphans its reaper collects.

The daemon is a child subreaper: restored trees and orphaned workload processes become its
children, and its reaper thread collects them. The reaper must never collect a process that
`subprocess` is waiting for (CRIU, the launcher): subprocess would see ECHILD and report exit
status 0, hiding a failed dump. Both sides take `LOCK`; a child is in `OWN` from the moment it
exists until subprocess has reaped it.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

LOCK = threading.Lock()
OWN: set[int] = set()


def run(
    cmd: Sequence[str], timeout: float | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """subprocess.run for a child the reaper must leave alone. Never uses a shell."""
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    proc: subprocess.Popen[str] = spawn(cmd, text=True, **kwargs)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        _forget(proc.pid)


def spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen for a child the reaper must leave alone until `reap` has collected
    it. Never uses a shell."""
    with LOCK:
        proc = subprocess.Popen(list(cmd), **kwargs)
        OWN.add(proc.pid)
    return proc


def reap(proc: subprocess.Popen[Any], kill: bool, timeout: float = 10.0) -> int | None:
    """Wait for a child started by `spawn` (SIGKILLed first with `kill`) and let the reaper
    have its PID again; None if it did not exit within `timeout` (it stays ours then)."""
    if kill and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    _forget(proc.pid)
    return rc


def _forget(pid: int) -> None:
    """`pid` has been waited for: the reaper may collect that PID again."""
    with LOCK:
        OWN.discard(pid)
