"""What a test left behind: processes, mounts, network namespaces, /dev/shm folders and
temporary folders that were not there before it and still are after it.

tests/conftest.py takes a snapshot before every test and compares after it (the autouse
`nothing_left_behind`): a test that leaves anything fails, naming it, and what it left is
removed (processes killed by PID) so that the next test starts clean.

Everything is scoped to this pytest process, because `make test` runs two xdist workers that
see each other's processes and mounts:
- a process counts when it descends from this process, or runs in one of this worker's
  temporary folders (a workload of a daemon that is gone has PID 1 as its parent), or carries
  this test's token in its environment (every child inherits it, whatever its session);
- a mount counts when its mount point is in this worker's folders;
- a network namespace, a /dev/shm folder, when something of this process made it during the
  test and said so (`made`: tests.support.hosts for namespaces, Daemon for its /dev/shm
  folder);
- a temporary folder, when it is in this worker's tempfile folder (every mkdtemp lands there).
A process that a session fixture keeps for later tests (moto_server) is declared with
`outlives_test`. Comparison is by PID and start time, never by program name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import tree_pids

TOKEN_VAR = "CHECKPOINTER_TEST_TOKEN"
NETNS = Path("/run/netns")

_kept: set[tuple[int, int]] = set()  # (pid, start time) of processes session fixtures keep
_made: dict[str, set[Path]] = {"netns": set(), "shm": set()}


def outlives_test(pid: int) -> None:
    """Declare a process that a session fixture keeps running for later tests."""
    key = _identity(pid)
    if key is not None:
        _kept.add(key)


def made(kind: str, path: Path) -> None:
    """Declare a network namespace ("netns": its /run/netns file) or a /dev/shm folder
    ("shm") that this process made: at the end of the test it must be gone."""
    _made[kind].add(path)


@dataclass
class Snapshot:
    processes: set[tuple[int, int]]
    mounts: set[str]
    temp_entries: set[str]
    folders: list[Path] = field(default_factory=list)


def snapshot(folders: list[Path], temp_root: Path) -> Snapshot:
    """What exists now, of what a test could leave behind."""
    for kind in _made:
        _made[kind].clear()
    return Snapshot(
        processes=set(_ours(folders, token=None)),
        mounts=_mounts_in(folders),
        temp_entries=_entries(temp_root),
        folders=folders,
    )


def left_behind(before: Snapshot, temp_root: Path, token: str, grace: float = 3.0) -> list[str]:
    """What is here now and was not before, as lines for the failure message. Processes are
    killed and mounts unmounted (the next test starts clean), the rest left as it is. Waits up
    to `grace` seconds for processes on their way out (a tree whose daemon is gone is reaped by
    PID 1, about 2 s late on these machines)."""
    deadline = time.monotonic() + grace
    while True:
        procs = {k: v for k, v in _ours(before.folders, token).items() if k not in before.processes}
        procs = {k: v for k, v in procs.items() if k not in _kept}
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = [f"process {pid} ({cmd}){_own_namespaces(pid)}" for (pid, _), cmd in procs.items()]
    for pid, _ in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    mounts = sorted(_mounts_in(before.folders) - before.mounts, reverse=True)  # inner first
    for m in mounts:
        subprocess.run(["umount", "--lazy", m], capture_output=True, check=False)
    out += [f"mount {m}" for m in reversed(mounts)]
    out += [f"network namespace {p}" for p in sorted(_made["netns"]) if p.exists()]
    out += [f"/dev/shm folder {p}" for p in sorted(_made["shm"]) if p.exists()]
    out += [
        f"temporary folder {temp_root / e}"
        for e in sorted(_entries(temp_root) - before.temp_entries)
    ]
    return out


def _identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks): a PID used again is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # dead, waiting to be reaped: nothing runs any more
        return None
    return pid, int(fields[19])


def _ours(folders: list[Path], token: str | None) -> dict[tuple[int, int], str]:
    """This process's live descendants and the processes working in FOLDERS or carrying
    TOKEN in their environment, with their command lines."""
    me = os.getpid()
    descendants = set(tree_pids(me)) - {me}
    needle = f"{TOKEN_VAR}={token}".encode() if token else None
    out: dict[tuple[int, int], str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            ours = pid in descendants
            if not ours:
                cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
                ours = any(Path(cwd).is_relative_to(f) for f in folders)
            if not ours and needle is not None:
                ours = needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes() if ours else b""
        except OSError:  # gone, a zombie, or not ours to read
            continue
        key = _identity(pid) if ours else None
        if key is not None:
            out[key] = argv.replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    return out


def _own_namespaces(pid: int) -> str:
    """ ", in its own network/mount namespace" when a leftover process holds one."""
    own = []
    for ns in ("net", "mnt"):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                own.append(ns)
    return f", in its own {' and '.join(own)} namespace" if own else ""


def _mounts_in(folders: list[Path]) -> set[str]:
    """Mount points (this mount namespace's) in FOLDERS."""
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if any(Path(point).is_relative_to(f) for f in folders):
            out.add(point)
    return out


def _entries(root: Path) -> set[str]:
    try:
        return set(os.listdir(root))
    except OSError:
        return set()
