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

import os
import stat
import subprocess
from pathlib import Path

from checkpointer.host import children

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
        refused = _untrusted(folder, st)
        if refused:
            return f"{refused}: CRIU runs without its probe cache"
        if fs_type(folder) != "tmpfs":
            out = children.run(
                ["mount", "-t", "tmpfs", "-o", _MOUNT_OPTIONS, "checkpointer-criu", str(folder)],
                timeout=30,
                capture_output=True,
            )
            if out.returncode != 0 or fs_type(folder) != "tmpfs":
                return (
                    f"cannot mount a tmpfs on {folder} ({out.stderr.strip() or 'not mounted'}): "
                    "CRIU runs without its probe cache"
                )
            return f"mounted a tmpfs on {folder} for CRIU's probe cache"
        # A CRIU killed between creating its temporary file and renaming it leaves the file,
        # and every later save then gives up (O_EXCL): none runs while the daemon starts.
        (folder / "criu.kdat.tmp").unlink(missing_ok=True)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return f"cannot prepare {folder} ({e}): CRIU runs without its probe cache"
    return f"CRIU keeps its probe cache in {folder} (tmpfs)"


def _untrusted(folder: Path, st: os.stat_result) -> str | None:
    """Why the folder cannot hold what every CRIU run as root trusts, or None: it and its
    parent must be root's and writable by no one else (a cache planted by anyone else would
    be loaded as the kernel's own answers)."""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        return f"{folder} is not a folder of root's with mode 0700"
    parent = os.lstat(folder.parent)
    if parent.st_uid != 0 or parent.st_mode & 0o022:
        return f"{folder.parent} is writable by others than root"
    return None


def status(criu_exe: str, folder: Path = KDAT_DIR) -> tuple[bool, str]:
    """For `doctor`, changing nothing: whether CRIU can keep its probe cache, and where."""
    if not uses_folder(criu_exe, folder):
        return True, "where this CRIU was built to keep it (/run/criu.kdat if /run is a tmpfs)"
    try:
        refused = _untrusted(folder, os.lstat(folder))
    except OSError:
        refused = None
    if refused:
        return False, f"{refused}: the daemon will not use it"
    if folder.is_dir() and not folder.is_symlink() and fs_type(folder) == "tmpfs":
        return True, f"{folder} (tmpfs): CRIU starts without probing the kernel"
    return False, f"{folder} is not a tmpfs yet: every CRIU run probes the kernel (~25-50 ms)"


def fs_type(path: Path) -> str:
    """The file system type of what holds `path` (this process's mount namespace): the mount
    whose device is the path's, as the kernel names both, so no mount point is parsed."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}".encode()
    kind = b""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # id parent MAJOR:MINOR root mountpoint options [optional...] - FSTYPE source ...
            fields = line.split()
            if len(fields) > 2 and fields[2] == want and b"-" in fields:
                kind = fields[fields.index(b"-") + 1]
    return kind.decode(errors="replace")
