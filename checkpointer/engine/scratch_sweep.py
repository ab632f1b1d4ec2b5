"""At start, the scratch folders a daemon killed mid-operation left behind, removed.

A dump, a restore, a lazy restore or a prefetch works in a folder of its own
(`Scratch.new`: NAME-OP-HEX, with an `images` folder inside) and removes it when it ends. A
daemon killed meanwhile (kill -9, OOM, power) leaves the folder: on /dev/shm that is memory
(a whole image per folder) until the next boot. So the daemon removes them as it starts,
before any operation of its own can make one, except:
- `hot`, the kept images (a valid one is still the fastest restore);
- a folder that a running process names on its command line: what the killed daemon started
  may outlive it for a while and still work there (an orphaned `criu restore`, the lazy
  restore's guard and its `criu lazy-pages`, which get `--images-dir FOLDER/images`);
- drill folders, which the drills' own sweep removes (Drills.sweep);
- anything not named as `Scratch.new` names folders (not ours to remove).
A folder kept for a process still working in it is removed at the next start. So are the
empty cgroups of lazy restores whose guard is gone (tree_cgroup.remove_stale).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from checkpointer.criu.lazy import tree_cgroup
from checkpointer.criu.lazy.guard import GUARD_NAME
from checkpointer.engine.scratch import Scratch, tmpfs_scratch_root

log = logging.getLogger(__name__)

_WORK = re.compile(r".+-(?!drill-)[a-z]+-[0-9a-f]{8}")


def sweep(scratch: Scratch) -> list[Path]:
    """Remove what earlier daemons left in `scratch`'s roots (see the module docstring);
    the folders removed."""
    roots = [scratch.configured, tmpfs_scratch_root(scratch.state_dir, scratch.shm)]
    roots.append(scratch.state_dir / "scratch")
    for cgroup in tree_cgroup.remove_stale(_is_guard):
        log.info("removed the cgroup %s of a lazy restore whose guard is gone", cgroup)
    leftovers = [f for root in roots if root is not None for f in _work_folders(root)]
    if not leftovers:
        return []
    in_use = _named_by_processes()
    removed = []
    for folder in leftovers:
        # Folder names end in 8 random hex digits: a match is this folder, not a namesake.
        user = next((pid for pid, arg in in_use if str(folder) in arg), None)
        if user is not None:
            log.info("scratch folder %s kept: process %d still works in it", folder, user)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info(
            "removed %d scratch folder(s) an earlier daemon left: %s",
            len(removed),
            ", ".join(f.name for f in removed),
        )
    return removed


def _work_folders(root: Path) -> list[Path]:
    """The operation folders in `root`, if it is one of ours (a real directory, not a
    symlink: Scratch refuses others, and so does this)."""
    try:
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return []
        entries = list(os.scandir(root))
    except OSError:
        return []
    return [
        Path(e.path) for e in entries if _WORK.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
    ]


def _is_guard(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == GUARD_NAME
    except OSError:
        return False


def _named_by_processes() -> list[tuple[int, str]]:
    """(PID, argument) for every argument of every running CRIU and lazy restore guard.

    Others are not read: /proc/PID/cmdline reads the process's own memory, and that of a
    tree still being restored lazily may be a page that never comes (the read then waits as
    long as the tree would). /proc/PID/comm is the kernel's copy."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                if comm in ("criu", GUARD_NAME):
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                    found += [(int(entry), a.decode(errors="replace")) for a in argv]
    return found
