"""Scratch folders for images: where CRIU dumps before the repository stores, where images are
rebuilt before CRIU restores, and where each workload's newest image is kept.

They hold the whole memory of processes and CRIU restores from them as root, so nobody else
may own or redirect them. /dev/shm is world-writable and emptied at boot: a local user could
create our predictable folder name (or a symlink by that name) before the daemon does. A root
is therefore used only if it is a real directory (not a symlink), owned by us, mode 0700; one
that is not is refused with an error in the log, and the daemon falls back to the scratch
folder inside its own 0700 state folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

from checkpointer.workloads import process

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
HEADROOM = 64 * 1024 * 1024


class UnsafeFolder(OSError):
    """A folder we are about to trust is not ours alone."""


def tmpfs_scratch_root(state_dir: Path, shm: Path = SHM) -> Path:
    """The daemon's folder in /dev/shm, named after its state folder: two daemons on one host
    (or in tests) never share scratch or kept images."""
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return shm / f"checkpointer-{tag}"


def private_dir(path: Path) -> Path:
    """Create `path` (0700, ours) or accept it only if it already is exactly that."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeFolder(f"{path} is not a directory (a symlink or a file put there)")
    if st.st_uid != os.geteuid():
        raise UnsafeFolder(f"{path} is owned by uid {st.st_uid}, not by the daemon")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeFolder(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, not 700")
    return path


class Scratch:
    def __init__(self, state_dir: Path, configured: Path | None, shm: Path = SHM) -> None:
        self.state_dir = state_dir
        self.configured = configured
        self.shm = shm
        self._refused: set[Path] = set()

    def fallback_root(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return private_dir(self.state_dir / "scratch")

    def root(self, pid: int | None = None) -> Path:
        """The configured folder, else /dev/shm when it has room for twice the tree's RSS
        (dumping to tmpfs shortens the pause), else STATE_DIR/scratch."""
        if self.configured is not None:
            self.configured.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            return private_dir(self.configured)
        if pid is not None and self.shm.is_dir():
            need = 2 * process.tree_rss(pid) + HEADROOM
            st = os.statvfs(self.shm)
            if st.f_bavail * st.f_frsize > need:
                shm_root = tmpfs_scratch_root(self.state_dir, self.shm)
                try:
                    return private_dir(shm_root)
                except UnsafeFolder as e:
                    if shm_root not in self._refused:
                        self._refused.add(shm_root)
                        log.error(
                            "refusing scratch folder %s: %s; someone else created it: remove it "
                            "(`rm -r %s`) and find out who; using %s meanwhile",
                            shm_root,
                            e,
                            shm_root,
                            self.state_dir / "scratch",
                        )
        return self.fallback_root()

    def new(self, name: str, op: str, pid: int | None = None) -> Path:
        """A fresh, private `images` folder; its parent is removed when done with it."""
        work = self.root(pid) / f"{name}-{op}-{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        images = work / "images"
        images.mkdir(mode=0o700)
        return images

    def kept_root(self, images: Path) -> Path:
        """Kept images live beside the scratch folders of the same root."""
        return private_dir(images.parent.parent / "hot")
