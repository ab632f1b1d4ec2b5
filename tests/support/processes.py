"""Process trees: their PIDs, start times, kill -9 of a whole tree, a server started outside
the daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.net import http_get
from tests.support.paths import COUNTER


def tree_pids(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    out, stack = [root], [root]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def kill_tree(root: int) -> None:
    """kill -9 every process of the tree, as a crash or the OOM killer would."""
    for pid in tree_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{root}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@contextlib.contextmanager
def counter_started_elsewhere(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A counter server that the daemon did not start (to adopt), killed and reaped at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(COUNTER), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        http_get(port)  # listening; this is request 1
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
