"""A root-only tmpfs for CRIU's cache of its kernel probes, so that CRIU starts without them.

Every CRIU process starts by probing the kernel (kerndat: ~25 ms on a quiet host here, ~50 on
a busy one) unless it finds the result of an earlier probe in `<RUNDIR>/criu.kdat`. CRIU keeps
that file only on tmpfs (a reboot, which may change the kernel, must drop it) and RUNDIR is
/run by default; /run is a tmpfs on systemd hosts, but not on these machines. The CRIU that
scripts/install-criu.sh builds therefore looks in `KDAT_DIR`, and the daemon (like the install
script) makes that folder a tmpfs, root's and 0700, when it is not one: what the probes found
is then trusted by every CRIU run as root, so no one else may write there.

A lazy restore runs two CRIU processes one after the other (the lazy-pages daemon, then the
restore), so it gains the probe twice; every dump and restore gains it once.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from checkpointer import children

log = logging.getLogger(__name__)

KDAT_DIR = Path("/run/checkpointer-criu")  # RUNDIR of the build in scripts/install-criu.sh
_MOUNT_OPTIONS = "mode=0700,size=1m,nosuid,nodev,noexec"


def uses_folder(criu_exe: str, folder: Path = KDAT_DIR) -> bool:
    """Whether this CRIU binary keeps its cache in `folder` (it holds the path as a string)."""
    try:
        with open(criu_exe, "rb") as f:
            return f"{folder}/criu.kdat".encode() in f.read()
    except OSError:
        return False


def ensure(criu_exe: str, folder: Path = KDAT_DIR) -> str:
    """Make `folder` a tmpfs CRIU can keep its cache on, if this CRIU uses it; never fails
    (CRIU works without the cache, only slower). Returns what was found or done, for the log."""
    if not uses_folder(criu_exe, folder):
        return "this CRIU keeps its probe cache where it was built to (not ours to set up)"
    try:
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            folder.mkdir(mode=0o700)
            st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            return f"{folder} is not a folder of root's: CRIU runs without its probe cache"
        if fs_type(folder) == "tmpfs":
            os.chmod(folder, 0o700)
            return f"CRIU keeps its probe cache in {folder} (tmpfs)"
        out = children.run(
            ["mount", "-t", "tmpfs", "-o", _MOUNT_OPTIONS, "checkpointer-criu", str(folder)],
            timeout=30,
            capture_output=True,
        )
    except (OSError, ValueError) as e:
        return f"cannot prepare {folder} ({e}): CRIU runs without its probe cache"
    if out.returncode != 0 or fs_type(folder) != "tmpfs":
        return (
            f"cannot mount a tmpfs on {folder} ({out.stderr.strip() or 'not mounted'}): "
            "CRIU runs without its probe cache"
        )
    return f"mounted a tmpfs on {folder} for CRIU's probe cache"


def status(criu_exe: str, folder: Path = KDAT_DIR) -> tuple[bool, str]:
    """For `doctor`, changing nothing: whether CRIU can keep its probe cache, and where."""
    if not uses_folder(criu_exe, folder):
        return True, "where this CRIU was built to keep it (/run/criu.kdat if /run is a tmpfs)"
    if folder.is_dir() and not folder.is_symlink() and fs_type(folder) == "tmpfs":
        return True, f"{folder} (tmpfs): CRIU starts without probing the kernel"
    return False, f"{folder} is not a tmpfs yet: every CRIU run probes the kernel (~25-50 ms)"


def fs_type(path: Path) -> str:
    """The file system type of the mount `path` lies on (this process's mount namespace)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # id parent dev root MOUNTPOINT options [optional...] - FSTYPE source options
            point = fields[4].encode().decode("unicode_escape")
            fstype = fields[fields.index("-") + 1]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):  # the last of equals is the top one
                best, kind = point, fstype
    return kind
