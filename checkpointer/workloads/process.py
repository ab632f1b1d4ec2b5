"""Facts about live processes from /proc, and whole-tree teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (identifies it across PID reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def is_alive(pid: int, started: int | None = None) -> bool:
    """Running (not a zombie) and, if `started` is given, the same process as then."""
    st = state(pid)
    if st is None or st in "ZX":
        return False
    return started is None or start_time(pid) == started


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(root: int) -> list[int]:
    """Every process below `root` (not `root` itself), from one scan of /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent_of(int(entry))
            if ppid is not None:
                kids.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    stack = [root]
    while stack:
        for child in kids.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def teardown(root: int, started: int | None, timeout: float = 10.0) -> list[int]:
    """SIGKILL the whole tree under `root` and wait until none of its PIDs is left.

    Returns the PIDs still present after `timeout` (zombies whose parent outside the tree has
    not reaped them count as present: they still hold their PIDs).
    """
    if not is_alive(root, started):
        pids = []
    else:
        pids = [root, *descendants(root)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = [p for p in pids if state(p) is not None]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if state(p) is not None]
    return left


def tree_rss(root: int) -> int:
    """Resident bytes of a tree: what a dump of it will write, roughly."""
    total = 0
    for p in [root, *descendants(root)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def describe_exit(status: int) -> str:
    """A wait status as a person reads it."""
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def thaw(root: int) -> None:
    """SIGCONT the whole tree (left stopped by a final dump)."""
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def stop_tree(root: int) -> None:
    """SIGSTOP the whole tree: what CRIU's --leave-stopped leaves, for a container whose
    runtime can only leave it running or kill it."""
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
