"""A `proc.crtools` directory an interrupted CRIU left behind makes every later dump of a tree
with that working directory fail ("Can't create a directory (-17)"): CRIU's parasite mounts a
private /proc there while it dumps, and removes it after. Seen in a test run: one interrupted
dump, then every dump of workloads started in that folder failed for the rest of the run.

One is stale when it is an empty directory of root's, not a mount point (a CRIU using it has
/proc mounted on it), older than STALE_AFTER (a CRIU creates and mounts it within
milliseconds): then it is removed and the dump tried once more. Anything else is left to the
operator, with the error saying what to remove."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)
STALE_AFTER = 60.0


def clear(pid: int) -> bool:
    """Remove the stale `proc.crtools` in the working directory of `pid`; whether one was."""
    try:
        folder = Path(os.readlink(f"/proc/{pid}/cwd")) / "proc.crtools"
        st = os.lstat(folder)
    except OSError:
        return False
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != 0
        or os.path.ismount(folder)
        or time.time() - st.st_mtime < STALE_AFTER
    ):
        return False
    try:
        folder.rmdir()  # fails if not empty: then it is not ours to remove
    except OSError:
        return False
    log.warning("removed %s, left behind by an interrupted CRIU run", folder)
    return True
