"""A cgroup v2 of its own for a lazily restored tree in the host's PID namespace: no process of
the tree can leave it during the transfer, and one write kills every process in it.

Why: a process of an adopted tree that daemonizes (fork, its parent exits) is re-parented out
of the tree; following the tree by its parent links misses one whose parent exits between two
scans (seen: 12 of 61 processes of a program daemonizing in a loop outlived a failed lazy
restore, on missing pages). A cgroup holds forks whatever their parents do, and `cgroup.kill`
(Linux 5.14) SIGKILLs every member, those forked during the kill included.

The cgroup is made a child of the one the root is in (`checkpointer-lazy-GUARDPID`): the tree
stays under its limits and accounting, and a parent with processes of its own has no domain
controllers enabled, so the child takes processes. The processes are moved in at CRIU's
post-restore hook, when they all exist and none has run, and moved back to the root's cgroup
once the transfer is complete.

Standard library only: the lazy restore's guard imports it (see checkpointer.criu.lazy.guard).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PREFIX = "checkpointer-lazy-"


def mount_point() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on a hybrid
    host); None without one."""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def cgroup_of(pid: int, mount: Path) -> Path | None:
    """The cgroup v2 folder `pid` is in; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return None


class TreeCgroup:
    """One tree's cgroup (`path`), and the cgroup its processes go back to (`home`)."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.home = home

    @classmethod
    def create(cls, root: int, pids: Iterable[int], tag: str) -> TreeCgroup:
        """Make the cgroup beside `root`'s and move `pids` (every process of the tree; none
        may run meanwhile, or a fork could stay outside) into it. Raises OSError naming the
        problem if it cannot (no cgroup v2, or it refuses the processes); nothing is left then.
        """
        mount = mount_point()
        if mount is None:
            raise OSError(errno.ENOENT, "no cgroup v2 hierarchy is mounted")
        home = cgroup_of(root, mount)
        if home is None:
            raise ProcessLookupError(errno.ESRCH, f"the restored tree {root} is gone")
        tree = cls(home / f"{PREFIX}{tag}", home)
        os.mkdir(tree.path, 0o755)
        try:
            for pid in pids:
                _move(pid, tree.path)
        except OSError:
            tree.release()
            raise
        return tree

    def members(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def empty(self) -> bool:
        """No process of the tree runs any more (exited ones, zombies too, are not members)."""
        try:
            return "populated 0" in (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return True

    def kill(self) -> None:
        """SIGKILL every member, forks made during the kill included."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            if self.path.exists():  # a kernel before 5.14: one by one, again on every call
                for pid in self.members():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)

    def release(self, timeout: float = 5.0) -> bool:
        """Move every member back home and remove the cgroup (forks made meanwhile are in
        it still: moved on the next round). False if it could not be removed in time."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.members():
                with contextlib.suppress(OSError):
                    _move(pid, self.home)
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
            time.sleep(0.01)

    def remove(self) -> None:
        """Remove the cgroup once it is empty (after `kill`); quiet if it is not yet."""
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def remove_stale(guard_alive: Callable[[int], bool]) -> list[Path]:
    """Remove the empty lazy restore cgroups whose guard (the PID in the name) is gone: a
    guard and its daemon that both died mid-transfer leave theirs. One with processes still
    in it is left alone (they are not ours to kill now). The cgroups removed."""
    mount = mount_point()
    removed: list[Path] = []
    if mount is None:
        return removed
    for folder, subfolders, _ in os.walk(mount):
        for name in list(subfolders):
            tag = name.removeprefix(PREFIX)
            if tag != name and tag.isdigit() and not guard_alive(int(tag)):
                subfolders.remove(name)  # not below: none is made inside one
                with contextlib.suppress(OSError):  # EBUSY: processes in it
                    os.rmdir(Path(folder) / name)
                    removed.append(Path(folder) / name)
    return removed


def _move(pid: int, cgroup: Path) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited: nothing to confine
        (cgroup / "cgroup.procs").write_text(str(pid))
