"""The users a tree's processes run as, and what CRIU then needs: checked before CRIU freezes
the tree, so that a dump that cannot succeed fails at once with the way out, not after CRIU has
frozen the tree and written its memory (CRIU reads the resource limits after the pages).

Two things stop CRIU when a process switched to another user (memcached -u, nginx's workers,
PostgreSQL; measured with CRIU 4.2.1 on Linux 6.18):
- The tree's first process in its own PID namespace but with the host's /proc (every managed
  workload) must mount a /proc of its namespace for CRIU's parasite, which needs root
  (CAP_SYS_ADMIN): "can't dump unprivileged task whose /proc doesn't belong to it". The way
  out is the service's init as PID 1 (workloads/init.py), which stays root.
- CRIU reads every process's resource limits with prlimit(), which the kernel allows on
  another user's process only with CAP_SYS_RESOURCE ("Can't get rlimit 0: Operation not
  permitted"). Root without it (a container, a systemd unit's CapabilityBoundingSet, these
  test machines) can dump no process of another user, adopted or managed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from checkpointer.criu.failures import CriuFailure
from checkpointer.workloads import process
from checkpointer.workloads.launch import INIT_COMMAND

CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Identity:
    """Who a process is, from /proc/PID/status."""

    pid: int
    name: str
    uids: tuple[int, int, int]  # real, effective, saved
    gids: tuple[int, int, int]
    capabilities: int  # effective set (CapEff)


@dataclass(frozen=True)
class Blocker:
    """Why CRIU cannot dump a tree now; `category` as failures.classify names the CRIU error."""

    category: CriuFailure
    message: str


def identity(pid: int) -> Identity | None:
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        u = [int(x) for x in fields["Uid"].split()]
        g = [int(x) for x in fields["Gid"].split()]
        name, caps = fields["Name"].strip(), int(fields["CapEff"], 16)
        return Identity(pid, name, (u[0], u[1], u[2]), (g[0], g[1], g[2]), caps)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def daemon_has(capability: int) -> bool:
    """Whether this process holds `capability` in its effective set."""
    me = identity(os.getpid())
    return me is not None and bool(me.capabilities >> capability & 1)


def _same_namespace(pid: int, kind: str) -> bool | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None


def _other_user(who: Identity) -> bool:
    """prlimit() on `who` needs CAP_SYS_RESOURCE: the kernel lets a process without it read
    only processes whose real, effective and saved uids and gids all equal its own real ones."""
    uid, gid = os.getuid(), os.getgid()
    return any(u != uid for u in who.uids) or any(g != gid for g in who.gids)


def dump_blocker(root: int) -> Blocker | None:
    """What stops CRIU from dumping the tree under `root` now, or None. Unknown is None: a
    process that is gone or unreadable is CRIU's to report."""
    first = identity(root)
    if first is None:
        return None
    own_pid_ns = _same_namespace(root, "pid") is False
    host_proc = _same_namespace(root, "mnt") is True
    if own_pid_ns and host_proc and not first.capabilities >> CAP_SYS_ADMIN & 1:
        return Blocker(
            CriuFailure.SWITCHED_USER,
            f"the tree's first process (pid {root}, {first.name}) runs as uid {first.uids[1]} "
            "without CAP_SYS_ADMIN: CRIU needs it to be root (it mounts the /proc of the tree's "
            "PID namespace from inside it); start the program under the service's init, which "
            "stays root: `checkpointer run NAME -- checkpointer-init COMMAND...` (in the "
            "config: command: [checkpointer-init, ...])",
        )
    if daemon_has(CAP_SYS_RESOURCE):
        return None
    for pid in [root, *process.descendants(root)]:
        who = identity(pid)
        if who is not None and _other_user(who) and _same_namespace(pid, "user") is not False:
            return Blocker(
                CriuFailure.NEEDS_CAP_SYS_RESOURCE,
                f"process {pid} ({who.name}) of the tree runs as uid {who.uids[1]} gid "
                f"{who.gids[1]}: {SYS_RESOURCE_NEEDED}",
            )
    return None


SYS_RESOURCE_NEEDED = (
    "CRIU reads the resource limits of every process it checkpoints, which for a process of "
    "another user needs CAP_SYS_RESOURCE, and this daemon runs without it; run the daemon with "
    "every capability (systemd: no CapabilityBoundingSet that leaves out CAP_SYS_RESOURCE; a "
    "container: --cap-add SYS_RESOURCE), or keep the workload's processes running as root"
)


def init_refusal(command: Sequence[str]) -> str | None:
    """Why a managed command under the service's init cannot be checkpointed on this host, or
    None. The init is there for a program that switches to another user, which this daemon
    could never checkpoint without CAP_SYS_RESOURCE: refused at `run`, not at every dump."""
    if command[:1] != [INIT_COMMAND] or daemon_has(CAP_SYS_RESOURCE):
        return None
    return (
        f"{INIT_COMMAND} is for programs that switch to another user, and {SYS_RESOURCE_NEEDED}; "
        f"if the program keeps running as root, start it without {INIT_COMMAND}"
    )
