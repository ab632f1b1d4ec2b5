"""Freeze and thaw a container through its cgroup files, behind its runtime's back.

`podman pause` would freeze the container too, but Podman then records it as paused and its
`container checkpoint` refuses it. runc, which Podman runs for the checkpoint, looks at the
cgroup itself: it dumps a frozen cgroup and leaves it frozen (tried on these hosts, Podman 4.3,
runc 1.1). So a migration freezes the container's cgroup from before its final dump until it
is killed, and nothing it writes after the dump is lost on the target.

These hosts mount the cgroup v1 controllers under /sys/fs/cgroup/<controller> and a v2
hierarchy without controllers at /sys/fs/cgroup/unified (CRIU-ON-THIS-MACHINE.md); a pure v2
host has `cgroup.freeze` in /sys/fs/cgroup. The cgroup comes from the kernel
(/proc/PID/cgroup), never from a runtime's config.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V2_BASES = (CGROUP_ROOT / "unified", CGROUP_ROOT)


def _cgroups(pid: int) -> list[tuple[str, str]]:
    """(controllers, path relative to its hierarchy) of each hierarchy `pid` is in."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            found.append((parts[1], parts[2].lstrip("/")))
    return found


def _freezer_files(pid: int) -> list[tuple[Path, str, str]]:
    """(file, frozen value, thawed value) of every freezer `pid` is under: the v1 freezer
    controller's `freezer.state` and the v2 `cgroup.freeze`."""
    files = []
    for controllers, rel in _cgroups(pid):
        if not rel or ".." in Path(rel).parts:
            continue  # the root cgroup is never ours to freeze
        if "freezer" in controllers.split(","):
            state = CGROUP_ROOT / "freezer" / rel / "freezer.state"
            if state.is_file():
                files.append((state, "FROZEN", "THAWED"))
        elif controllers == "":
            for base in V2_BASES:
                if (base / rel / "cgroup.freeze").is_file():
                    files.append((base / rel / "cgroup.freeze", "1", "0"))
                    break
    return files


def own_cgroup(pid: int, marker: str) -> str | None:
    """Why `pid`'s cgroups are not safe to freeze as the container's own, or None if they are:
    every cgroup path must name the container (`marker`, its full id) and none may hold this
    service (a container run with `--cgroups=disabled` shares its caller's cgroup: freezing it
    would freeze the daemon)."""
    ours = {rel for _, rel in _cgroups(os.getpid())}
    found = _cgroups(pid)
    if not found:
        return f"cannot read the cgroups of PID {pid}"
    for controllers, rel in found:
        if marker not in Path(rel).name or rel in ours:
            return f"PID {pid} is in cgroup {controllers or 'v2'}:/{rel}, not one of its own"
    return None


def freeze(pid: int, timeout: float = 10.0) -> bool:
    """Freeze the cgroup(s) of `pid` and wait until every task in them is frozen. One
    freezer is enough: the v1 one where it exists, else v2's. False (and thawed again) if
    there is none or the freeze does not complete in `timeout` (a task stuck in the kernel)."""
    files = _freezer_files(pid)
    v1 = [f for f in files if f[0].name == "freezer.state"]
    chosen = (v1 or files)[:1]
    if not chosen:
        return False
    path, frozen, _ = chosen[0]
    try:
        path.write_text(frozen)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while not _is_frozen(path):
        if time.monotonic() > deadline:
            thaw(pid)
            return False
        time.sleep(0.01)
    return True


def _is_frozen(path: Path) -> bool:
    try:
        if path.name == "freezer.state":
            return path.read_text().strip() == "FROZEN"
        events = (path.parent / "cgroup.events").read_text().split()
        return "frozen" in events and events[events.index("frozen") + 1] == "1"
    except (OSError, IndexError):
        return False


def thaw(pid: int) -> None:
    """Thaw every freezer `pid` is under (v1 and v2 alike): CRIU restores the freezer state a
    container had at its dump, so a restored migration checkpoint may come back frozen."""
    for path, _, thawed in _freezer_files(pid):
        with contextlib.suppress(OSError):
            path.write_text(thawed)
