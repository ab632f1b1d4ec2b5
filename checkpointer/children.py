"""Children the daemon waits for itself, kept apart from the orphans its reaper collects.

The daemon is a child subreaper: restored trees and orphaned workload processes become its
children, and its reaper thread collects them. The reaper must never collect a process that
`subprocess` is waiting for (CRIU, the launcher): subprocess would see ECHILD and report exit
status 0, hiding a failed dump. Both sides take `LOCK`; a child is in `OWN` from the moment it
exists until subprocess has reaped it.
"""

from __future__ import annotations

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
    with LOCK:
        proc = subprocess.Popen(list(cmd), text=True, **kwargs)
        OWN.add(proc.pid)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        with LOCK:
            OWN.discard(proc.pid)
