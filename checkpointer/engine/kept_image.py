"""The newest image of a workload, kept in scratch after it was stored, and how to trust it.

Restoring the newest checkpoint from this folder needs no download and no decompression. To
know the folder still holds exactly the bytes that were stored, we record each file's size,
mtime, ctime and inode right after the commit read and hashed them (git's index does the same).
Any write to a file changes its ctime, which no one can set back; the folder is 0700 root's.
Checking the stamps costs microseconds, where re-hashing a 1 GB image costs a quarter second:
that is most of a restore's time.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

Stamp = dict[str, list[int]]


def stamp(folder: Path) -> Stamp:
    out: Stamp = {}
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            out[entry.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def unchanged(folder: Path, recorded: Stamp) -> bool:
    """Whether every recorded file is still there, untouched. New files (CRIU writes
    stats-restore on restore) do not matter."""
    if not recorded:
        return False
    try:
        current = stamp(folder)
    except FileNotFoundError:
        return False
    return all(current.get(name) == st for name, st in recorded.items())


@dataclass(frozen=True)
class KeptImage:
    """Where a workload's newest image is kept, which checkpoint it is, and its stamps."""

    id: str
    path: Path
    stamp: Stamp

    def intact(self) -> bool:
        return trusted(self.path) and unchanged(self.path, self.stamp)


def trusted(path: Path) -> bool:
    """The folder, its `hot` parent and the scratch root above are real directories, ours,
    0700. A path recorded in the registry outlives a reboot, and /dev/shm is emptied then:
    whoever creates the root first (or a symlink in it) must not get us to read, or to
    remove as root, a folder of theirs."""
    return all(private_folder(p) for p in (path, path.parent, path.parent.parent))


def private_folder(path: Path) -> bool:
    """A real directory (not a symlink), ours, 0700."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not stat.S_IMODE(st.st_mode) & 0o077
    )


def keep(
    images: Path, root: Path, name: str, checkpoint_id: str, old: KeptImage | None
) -> KeptImage:
    """Make the image just stored the workload's kept image, in place of `old`."""
    hot, new = root / name, root / f".{name}.new"
    shutil.rmtree(new, ignore_errors=True)
    os.rename(images, new)
    drop(old)
    shutil.rmtree(hot, ignore_errors=True)  # left by an earlier registration of the name
    os.rename(new, hot)
    return KeptImage(checkpoint_id, hot, stamp(hot))


def drop(kept: KeptImage | None) -> None:
    """Remove a kept image, if it is still our own folder (else only forget it)."""
    if kept is not None and trusted(kept.path):
        shutil.rmtree(kept.path, ignore_errors=True)
