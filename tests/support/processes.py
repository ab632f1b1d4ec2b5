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


def working_in(folders: list[Path]) -> dict[int, str]:
    """The live processes whose working directory is one of FOLDERS or below (a removed folder
    counts too), with their command lines. A test's workloads run in its daemon's folder (see
    Daemon.cli), so this finds what a worker's tests started and left, and nothing of a
    parallel worker's or of another run on the machine."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd").removesuffix(" (deleted)")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone, or a zombie (no cwd): not running
            continue
        if any(Path(cwd).is_relative_to(f) for f in folders):
            out[int(entry)] = argv.replace(b"\0", b" ").decode(errors="replace").strip()
    return out


def kill_tree(root: int, reaped: bool = True) -> None:
    """kill -9 every process of the tree, as a crash or the OOM killer would, and wait until
    its root is reaped (its PID free again: a restore may need it) or, with `reaped=False`,
    only dead. A tree whose daemon is gone is reaped by PID 1, which on these machines does
    it about 2 s late: a teardown need not wait for that."""
    for pid in tree_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = _state(root)
        if state is None or (state == "Z" and not reaped):
            return
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), or None once it is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


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
