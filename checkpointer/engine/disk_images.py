"""The newest checkpoints' images, kept on disk too: what a reboot, and a rollback, restore from.

A reboot empties /dev/shm, and rebuilding a 1 GB image from the repository takes seconds where
CRIU restores it in under one; a rollback to the checkpoint before the newest rebuilds it as
well. So after each commit the kept image is also copied into one of a few slots under
STATE_DIR/images/NAME/ (0700, root's), the one holding the oldest checkpoint: the newest N
checkpoints then each have a folder CRIU restores from directly.

Cost: each slot is one image on disk (unencrypted: like the kept image in /dev/shm it is the
process's memory, readable by root only; `criu.disk_images: 0` keeps none), and each
checkpoint writes the pages that differ from what the slot held (page digests compared at the
same offset, the slot's digests kept beside it in NAME/SLOT.pages/: the whole image the first
time and the first time after a reboot, a slot's share of the changes after), plus one BLAKE3
pass over the image (0.16 s a GB, multithreaded). Nothing is fsynced: a crash before
writeback leaves a file that no longer matches its digest, and the restore falls back to the
repository.

Trust: the copy comes from the kept image, whose bytes the commit hashed. Within the boot
that wrote a slot, its files' stamps (as for the kept image) say nothing has written to them
since. After a reboot the stamps say nothing of the disk under them, so each file's BLAKE3 is
computed again, one multithreaded call, and must equal the digest taken of the source when it
was copied. A mismatch drops the slot and the restore reads the repository.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt

from checkpointer.engine import kept_image
from checkpointer.engine.kept_image import Stamp
from checkpointer.engine.scratch import private_dir
from checkpointer.host import info as hostinfo
from storage.file_copy import copy_range
from storage.manifest import CHUNK_SIZE, DIGEST_SIZE, Manifest

log = logging.getLogger(__name__)

_DIGEST_WINDOW = 1 << 20  # old page digests compared this many bytes at a time (32K pages)
_HASH_WINDOW = 8 << 20  # mapped and hashed at a time (resident while mapped): 0.18 s a GB


@dataclass(frozen=True)
class DiskImage:
    """Slot `slot` of a workload holds checkpoint `id`: each file's BLAKE3 (hex) taken from
    the source as it was copied, the files' stamps right after, and the boot that wrote it."""

    id: str
    slot: int
    path: Path
    digests: dict[str, str]
    stamp: Stamp
    boot: str

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "slot": self.slot,
            "path": str(self.path),
            "digests": self.digests,
            "stamp": self.stamp,
            "boot": self.boot,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> DiskImage:
        return cls(
            str(d["id"]),
            int(d["slot"]),  # type: ignore[call-overload]
            Path(str(d["path"])),
            dict(d.get("digests") or {}),  # type: ignore[call-overload]
            dict(d.get("stamp") or {}),  # type: ignore[call-overload]
            str(d.get("boot", "")),
        )


class DiskImages:
    """The slots of every workload, under `root`; `slots` per workload (0: none)."""

    def __init__(self, root: Path, slots: int) -> None:
        self.root = root
        self.slots = slots

    # -- writing ---------------------------------------------------------------------------

    def store(
        self,
        name: str,
        held: list[DiskImage],
        source: Path,
        manifest: Manifest,
        busy: int | None = None,
    ) -> list[DiskImage]:
        """Copy `source` (the kept image of `manifest`'s checkpoint) into the slot holding the
        oldest checkpoint, never slot `busy` (a lazy restore reads it); the slots' records
        afterwards (`held` without the overwritten one, plus the new one). On an error the
        slot is left without a record. Nothing is written if `busy` is the only slot."""
        held = self.prune(name, held)
        if self.slots <= 0:
            return []
        held = [d for d in held if d.id != manifest.id]
        free = sorted(set(range(self.slots)) - {d.slot for d in held} - {busy})
        others = [d for d in held if d.slot != busy]
        if not free and not others:
            log.info(
                "disk image of %s (%s) not written: its only slot is being read", name, manifest.id
            )
            return held
        slot = free[0] if free else min(others, key=lambda d: d.id).slot
        kept = [d for d in held if d.slot != slot]
        folder = self._slot_dir(name, slot)
        sidecar = private_dir(folder.parent / f"{slot}.pages")
        previous = next((d for d in held if d.slot == slot), None)
        # What the slot holds, page by page, is known only if its files are exactly as the
        # store that wrote them left them (their stamps), with their digests beside them, in
        # the boot that wrote them: after a reboot the stamps say nothing of the disk under
        # them (a cut writeback, bit rot), and a page skipped here would be trusted all boot.
        known = (
            previous is not None
            and previous.boot == hostinfo.boot_id()
            and kept_image.unchanged(folder, previous.stamp)
        )
        digests: dict[str, str] = {}
        wanted = {f.name for f in manifest.files}
        for place in (folder, sidecar):
            for entry in os.scandir(place):
                if entry.name not in wanted:
                    _remove(Path(entry.path))
        for f in sorted(manifest.files, key=lambda f: f.name):
            changed = _changed_pages(sidecar / f.name, f.digests) if known else None
            (sidecar / f.name).unlink(missing_ok=True)  # stale while the file changes
            digests[f.name] = _copy(source / f.name, folder / f.name, changed)
            _write_pages(sidecar / f.name, f.digests)
        image = DiskImage(
            manifest.id, slot, folder, digests, kept_image.stamp(folder), hostinfo.boot_id()
        )
        return [*kept, image]

    def prune(self, name: str, held: list[DiskImage]) -> list[DiskImage]:
        """`held` without the slots past `slots` (criu.disk_images lowered, or 0), their
        folders deleted: a record dropped alone left a whole image of the process's memory
        on disk that nothing named, restored from or deleted any more."""
        for image in held:
            if image.slot >= self.slots:
                self.drop(name, image)
        return [d for d in held if d.slot < self.slots]

    def _slot_dir(self, name: str, slot: int) -> Path:
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private_dir(self.root)
        private_dir(self.root / name)
        return private_dir(self.root / name / str(slot))

    # -- reading ---------------------------------------------------------------------------

    def find(self, name: str, held: list[DiskImage], checkpoint_id: str) -> DiskImage | None:
        """The slot holding `checkpoint_id`, if its files are still exactly what was copied."""
        image = next((d for d in held if d.id == checkpoint_id), None)
        if image is None:
            return None
        problem = self._problem(name, image)
        if problem is None:
            return image
        log.warning(
            "disk image of %s (checkpoint %s) is unusable (%s): dropping it",
            name,
            checkpoint_id,
            problem,
        )
        self.drop(name, image)
        return None

    def after_reboot(
        self, name: str, held: list[DiskImage], checkpoint_id: str
    ) -> DiskImage | None:
        """The slot holding `checkpoint_id` if a reboot came since it was written and its
        folder is the daemon's own, its files not hashed: a lazy restore checks each chunk it
        reads instead (checkpointer/engine/disk_image_files.py). None otherwise: `find`
        decides (within the boot that wrote it, its stamps are checked in no time)."""
        image = next((d for d in held if d.id == checkpoint_id), None)
        if image is None or image.boot == hostinfo.boot_id() or not image.path.is_dir():
            return None
        if image.slot >= self.slots:  # `find` drops it: the config no longer keeps it
            return None
        if image.path != self.root / name / str(image.slot) or not kept_image.trusted(image.path):
            return None
        return image

    def revalidated(self, image: DiskImage) -> DiskImage:
        """The record of an image checked after a reboot, as of this boot (checked once)."""
        return DiskImage(
            image.id, image.slot, image.path, image.digests, image.stamp, hostinfo.boot_id()
        )

    def _problem(self, name: str, image: DiskImage) -> str | None:
        if image.slot >= self.slots:
            return f"criu.disk_images is {self.slots} now"
        if not image.path.exists():
            return "its folder is gone"
        if image.path != self.root / name / str(image.slot) or not kept_image.trusted(image.path):
            return "its folder is not the daemon's own"
        if not image.digests:
            return "no digests recorded"
        if image.boot == hostinfo.boot_id():
            if kept_image.unchanged(image.path, image.stamp):
                return None
            return "a file changed since it was written"
        for fname, expected in image.digests.items():
            try:
                actual = file_digest(image.path / fname)
            except OSError as e:
                return f"{fname}: {e.strerror or e}"
            if actual != expected:
                return f"{fname} does not match its digest (damaged on disk, or cut by a crash)"
        return None

    # -- removing --------------------------------------------------------------------------

    def drop(self, name: str, image: DiskImage) -> None:
        if image.path == self.root / name / str(image.slot) and kept_image.trusted(image.path):
            shutil.rmtree(image.path, ignore_errors=True)
            shutil.rmtree(image.path.parent / f"{image.slot}.pages", ignore_errors=True)

    def drop_all(self, name: str) -> None:
        """Every slot of a workload (unregistered, or handed to another host)."""
        folder = self.root / name
        if kept_image.private_folder(folder) and kept_image.private_folder(self.root):
            shutil.rmtree(folder, ignore_errors=True)


def file_digest(path: Path) -> str:
    """BLAKE3 of a whole file, on every core (0.18 s a GB here, where reading it through a
    buffer took 0.42 s and per-page hashing 0.7 s). Mapped a window at a time: mapped pages
    count as the daemon's resident memory while the window lives, and an image is GBs."""
    # Non-blocking: a FIFO planted in a slot is refused below, not waited on for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for offset in range(0, st.st_size, _HASH_WINDOW):
            length = min(_HASH_WINDOW, st.st_size - offset)
            with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=offset) as window:
                h.update(window)
        return h.hexdigest()
    finally:
        os.close(fd)


def _changed_pages(old_path: Path, pages: bytes | bytearray) -> npt.NDArray[np.bool_] | None:
    """Which of the pages (their digests: `pages`) differ from the one at the same place in
    the slot, whose digests are in `old_path`; None when those cannot be read (then the file
    is copied whole). The old digests are read a window at a time: at 4 GB of image they are
    32 MB, which held whole beside the new ones was the daemon's peak after a checkpoint."""
    new_rows = np.frombuffer(pages, dtype=f"V{DIGEST_SIZE}")
    changed = np.ones(len(new_rows), dtype=bool)  # pages past the old file's end: changed
    window = bytearray(_DIGEST_WINDOW)
    try:
        with open(old_path, "rb", buffering=0) as f:
            at = 0
            while at < len(new_rows) and (n := f.readinto(window)):
                if n % DIGEST_SIZE:
                    return None  # cut short: not a list of digests
                old_rows = np.frombuffer(window, dtype=f"V{DIGEST_SIZE}", count=n // DIGEST_SIZE)
                k = min(len(old_rows), len(new_rows) - at)
                changed[at : at + k] = new_rows[at : at + k] != old_rows[:k]
                at += k
                del old_rows  # the window is read into again
    except OSError:
        return None
    return changed


def _write_pages(path: Path, digests: bytes | bytearray) -> None:
    """The page digests of a slot's file (the next store compares against them): beside the
    slot, not in it, where CRIU and the runtimes would see an unknown file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(digests)


def _copy(src: Path, dst: Path, changed: npt.NDArray[np.bool_] | None) -> str:
    """Make `dst` a copy of `src`, writing only the pages `changed` marks (`dst` holds the
    others already), or all of it if None. The BLAKE3 of `src`."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{src} is not a regular file")
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if changed is None:
            flags |= os.O_TRUNC
        dfd = os.open(dst, flags, 0o600)
        try:
            for offset, length in _changed_runs(changed, st.st_size):
                copy_range(sfd, dfd, length, offset, offset)  # tmpfs to disk: sendfile
            os.ftruncate(dfd, st.st_size)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode) & 0o700)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return file_digest(src)


def _changed_runs(changed: npt.NDArray[np.bool_] | None, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the runs of pages `changed` marks (everything if None), clipped
    to `size`."""
    if changed is None:
        return [(0, size)] if size else []
    # The last page of the old file may have been short: if it was, its digest differs from
    # a full page's, so a grown file copies it again.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], changed.view(np.int8), [0]))))
    runs = []
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        offset = start * CHUNK_SIZE
        runs.append((offset, min(end * CHUNK_SIZE, size) - offset))
    return [(o, n) for o, n in runs if n > 0]


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


__all__ = ["DiskImage", "DiskImages", "file_digest"]
