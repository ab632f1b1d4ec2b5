"""The tree a lazy restore brought back: every process of it, followed from before it runs,
and killed for sure before the copies of its userfaultfds are let go (the kernel would then
fill every missing page with zeroes under whatever of it still runs).

Shared by the daemon (checkpointer.criu.lazy.restore) and the guard (checkpointer.criu.lazy.guard),
so it imports the standard library, checkpointer.workloads.process and tree_cgroup only: the
guard must start fast (see checkpointer.criu.lazy.guard).

How every process is found depends on where the tree lives:
- In a PID namespace of its own (every managed workload: its root is the namespace's init),
  SIGKILL of the root makes the kernel kill every process of the namespace, forks made a
  moment ago and daemons that left the root's subtree included, and the root's pidfd polls
  readable only once all of them are gone. Nothing has to be followed: race-free.
- In the host's PID namespace (an adopted tree), a process that leaves the tree (double fork,
  its parent gone) is re-parented to the nearest subreaper, outside the root's subtree. So
  every process ever seen below the root, or below one seen before, is remembered by PID and
  start time, scanned at each `follow` (every 50 ms during a transfer) through
  /proc/PID/task/TID/children (cost grows with the tree, not with the host: a scan of all of
  /proc took 30 ms here with 215 processes). A process that forks and whose parent exits
  between two scans is not seen, so the guard also puts the tree in a cgroup v2 of its own at
  CRIU's post-restore hook, before any of it runs (`confine`, tree_cgroup): no
  fork leaves it, and its `cgroup.kill` kills them all; scanning is then not needed. Without
  cgroup v2 on the host, following is all there is, and such a process escapes the kill.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from pathlib import Path

from checkpointer.criu.lazy.tree_cgroup import PREFIX, TreeCgroup, cgroup_of, mount_point
from checkpointer.workloads.process import is_alive, start_time


class RestoredTree:
    """The restored root (`pid`, held by pidfd: never a reused PID) and, for a tree in the
    host's PID namespace, every process seen in it (PID and start time, for the same reason).
    Not thread-safe: callers serialize."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.own_namespace = False  # the root is the init of its own PID namespace
        self._root: int | None = None
        self._seen: dict[int, int | None] = {}  # pid -> start time
        self.cgroup: TreeCgroup | None = None  # every process of the tree is in it

    def adopt(self, pid: int) -> None:
        """The root CRIU restored. Raises ProcessLookupError if it is already gone."""
        self._root = os.pidfd_open(pid)
        self.pid = pid
        self.own_namespace = _namespace_init(pid) and _pidfd_alive(self._root)
        self.follow()

    def confine(self, tag: str) -> None:
        """Put every process of a tree in the host's PID namespace in a cgroup of its own
        (`checkpointer-lazy-TAG`). Call it while none of them runs (CRIU's post-restore hook):
        a fork made meanwhile could stay outside. Raises OSError if the host cannot."""
        if self.pid is None or self.own_namespace:
            return
        self.follow()
        alive = [p for p, t in self._seen.items() if is_alive(p, t)]
        self.cgroup = TreeCgroup.create(self.pid, [self.pid, *alive], tag)

    def find_cgroup(self) -> None:
        """Take the cgroup the guard confined the tree to, if it did (see `confine`)."""
        mount = mount_point() if self.pid is not None and not self.own_namespace else None
        path = cgroup_of(self.pid, mount) if self.pid is not None and mount else None
        if path is not None and path.name.startswith(PREFIX):
            self.cgroup = TreeCgroup(path, path.parent)

    def let_go(self) -> bool:
        """The tree owns its memory: its processes go back to the root's cgroup, ours is
        removed. False if it could not be."""
        cgroup, self.cgroup = self.cgroup, None
        return cgroup is None or cgroup.release()

    def follow(self) -> None:
        """Remember every process below the root and below those seen before (they keep their
        own children when they leave the tree). Nothing to do in a PID namespace or a cgroup
        of its own."""
        if self.pid is None or self.own_namespace or self.cgroup is not None:
            return
        todo = [p for p, t in self._seen.items() if is_alive(p, t)]
        if self._root is not None and _pidfd_alive(self._root):
            todo.append(self.pid)
        while todo:
            for child in _children(todo.pop()):
                if child not in self._seen or not is_alive(child, self._seen[child]):
                    self._seen[child] = start_time(child)
                    todo.append(child)

    def kill(self) -> None:
        """SIGKILL the root (by pidfd) and every process seen in the tree; again on every
        call, for processes forked meanwhile."""
        if self.pid is None:
            return
        self.follow()
        if self.cgroup is not None:
            self.cgroup.kill()
        if self._root is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._root, signal.SIGKILL)
        for p, started in self._seen.items():
            if is_alive(p, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def dead(self) -> bool:
        """Nothing of the tree runs any more (the root's pidfd polls readable once it exited;
        for a namespace's init, once every process of the namespace is gone)."""
        root_alive = self._root is not None and _pidfd_alive(self._root)
        if root_alive or (self.cgroup is not None and not self.cgroup.empty()):
            return False
        return not any(is_alive(p, t) for p, t in self._seen.items())

    def close(self) -> None:
        """Let the root's pidfd go (the tree is dead, or owns all its memory), and remove its
        cgroup if it is empty (dead)."""
        if self.cgroup is not None:
            self.cgroup.remove()
        if self._root is not None:
            os.close(self._root)
            self._root = None


def _pidfd_alive(pidfd: int) -> bool:
    """Whether the process has not exited yet (a pidfd polls readable once it has)."""
    ready, _, _ = select.select([pidfd], [], [], 0)
    return not ready


def _namespace_init(pid: int) -> bool:
    """Whether `pid` is PID 1 of a PID namespace below ours (NSpid: host PID ... 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a child belongs to the thread that forked it)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out
