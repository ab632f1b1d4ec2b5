"""A cgroup of its own for a restore drill's sandbox (`throttle` in DRILL_PRIORITY, off by
default): the lowest CPU weight and a CPU quota, so that CRIU's restore takes at most a
quarter of one CPU however long it runs.

Measured with bench/drill.py (priority.py has the runs): with the sandbox SCHED_IDLE, the quota
lowered the live counter's p99 during drills in three runs of four (x1.09 to x1.36 against
x1.52 to x1.57) and raised it in one (x1.81 against x1.64), while the drill took 2 to 3 times
longer; the nice-19 sandbox without it did better in both runs that had both. `cpu.idle`
(Linux 5.15) was tried too and is not set: under load the group got almost nothing (a 2 s
drill took 25 s) and the counter saw no difference.

Which hierarchy: the `cpu` controller where the kernel offers it beside the daemon's own
cgroup: on a cgroup v1 (or hybrid) host, the `cpu` hierarchy; on a cgroup v2 host only when
the daemon's cgroup delegates it to its children (its `cgroup.subtree_control` lists it:
systemd's `Delegate=` with the daemon in a leaf of its own). Where none is, the drill runs
without one, as before (SCHED_IDLE still), and says so in the daemon's log.

The sandbox's PID 1 joins the cgroup itself (init.py writes 0 to `cgroup.procs` first thing),
so everything it starts is in it from its first instruction. The cgroup is removed when the
drill ends; a daemon killed mid-drill leaves an empty one, which `remove_stale` removes at the
next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from checkpointer.criu.lazy.tree_cgroup import TreeCgroup

log = logging.getLogger(__name__)

PREFIX = "checkpointer-drill-"
QUOTA = 0.25  # of one CPU
# The quota's period: short, so that the sandbox's share comes in small slices.
PERIOD_US = 20_000


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy: where, which controllers, v2 or not."""

    mount: Path
    controllers: frozenset[str]
    v2: bool


def hierarchies(mountinfo: str) -> list[Hierarchy]:
    """The cgroup hierarchies in /proc/self/mountinfo's text."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3 or kind[0] not in ("cgroup", "cgroup2"):
            continue
        mount = Path(fields[4])
        if kind[0] == "cgroup2":
            with contextlib.suppress(OSError):
                names = frozenset((mount / "cgroup.controllers").read_text().split())
                found.append(Hierarchy(mount, names, True))
        else:
            found.append(Hierarchy(mount, frozenset(kind[2].split(",")), False))
    return found


def own_cgroup(h: Hierarchy, cgroup_file: str) -> Path | None:
    """This process's cgroup in `h`, from /proc/self/cgroup's text."""
    for line in cgroup_file.splitlines():
        _, names, path = line.split(":", 2)
        if (h.v2 and names == "") or (not h.v2 and h.controllers & set(names.split(","))):
            return h.mount / path.lstrip("/")
    return None


def cpu_parent() -> tuple[Path, bool] | None:
    """Where a child cgroup with the cpu controller can be made beside the daemon's own, and
    whether it is v2; None when nowhere (no cpu controller, or v2 without delegation)."""
    try:
        with open("/proc/self/mountinfo") as f:
            found = hierarchies(f.read())
        with open("/proc/self/cgroup") as f:
            mine = f.read()
    except OSError:
        return None
    for h in sorted(found, key=lambda h: h.v2):  # v1 first: on a hybrid host it has them
        parent = own_cgroup(h, mine)
        if parent is None or "cpu" not in h.controllers:
            continue
        if h.v2:
            try:
                if "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        return parent, h.v2
    return None


@dataclass
class SandboxCgroup:
    """The sandbox's cgroup (`folder`, None when none could be made: `notes` says why)."""

    folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    def procs(self) -> list[str]:
        """The `cgroup.procs` files the sandbox's PID 1 writes itself into."""
        return [str(self.folder / "cgroup.procs")] if self.folder is not None else []

    def remove(self, timeout: float = 5.0) -> bool:
        """Remove the folder (the sandbox's processes are gone: its PID 1 exited; a process
        still exiting keeps a cgroup busy a moment: TreeCgroup.release waits that out, as
        for a lazily restored tree's). False if it stayed."""
        if self.folder is None:
            return True
        if TreeCgroup(self.folder, self.folder.parent).release(timeout):
            return True
        log.warning("the drill's cgroup %s is still busy; removed at the next start", self.folder)
        return False


@contextlib.contextmanager
def sandbox_cgroup(quota: float = QUOTA) -> Iterator[SandboxCgroup]:
    """The sandbox's cgroup for the time of one drill (removed afterwards)."""
    group = create(quota)
    try:
        yield group
    finally:
        group.remove()


def create(quota: float = QUOTA) -> SandboxCgroup:
    """Make the sandbox's cgroup beside the daemon's own: the lowest weight, `quota` of one
    CPU. Never raises: what cannot be made is a note (the drill runs without it)."""
    group = SandboxCgroup()
    where = cpu_parent()
    if where is None:
        group.notes.append("no cgroup with the cpu controller for the sandbox")
        return group
    parent, v2 = where
    folder = parent / f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    try:
        os.mkdir(folder, 0o755)
    except OSError as e:
        group.notes.append(f"no cgroup for the sandbox: {e}")
        return group
    group.folder = folder
    if v2:
        _write(folder / "cpu.weight", "1", group.notes)
        _write(folder / "cpu.max", f"{int(quota * PERIOD_US)} {PERIOD_US}", group.notes)
    else:
        _write(folder / "cpu.shares", "2", group.notes)
        _write(folder / "cpu.cfs_period_us", str(PERIOD_US), group.notes)
        _write(folder / "cpu.cfs_quota_us", str(int(quota * PERIOD_US)), group.notes)
    return group


def _write(path: Path, value: str, notes: list[str]) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        notes.append(f"{path.name} = {value}: {e.strerror}")


def remove_stale() -> list[Path]:
    """Remove the empty sandbox cgroups of daemons that are gone (the PID in the name: beside
    this daemon's cgroup another daemon's may be in use); one with processes in it is left
    alone. The cgroups removed."""
    removed: list[Path] = []
    where = cpu_parent()
    if where is None:
        return removed
    with contextlib.suppress(OSError):
        for folder in where[0].glob(f"{PREFIX}*"):
            owner = folder.name.removeprefix(PREFIX).split("-")[0]
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            with contextlib.suppress(OSError):  # EBUSY: processes in it
                os.rmdir(folder)
                removed.append(folder)
    return removed
