"""Podman's export tar, flat in a checkpoint's folder and packed again for its import.

The export is a tar of CRIU's images (`checkpoint/`) and Podman's own files (`config.dump`,
`spec.dump`, `network.status`, `rootfs-diff.tar`, ...). Inside a tar, files sit on 512-byte
boundaries, so the tar itself would defeat the repository's 4 KiB page dedup: the folder stored
is the export unpacked, CRIU's images as they are and Podman's files prefixed with `podman.`;
a restore packs them into a tar again, the tars Podman unpacks as root checked first
(podman_rootfs.py).
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from checkpointer.containers import podman_rootfs
from checkpointer.containers.base import ContainerError, copy_range
from checkpointer.containers.rootfs_extract import UnsafeArchive

PREFIX = "podman."
IMAGES_DIR = "checkpoint"
EMPTY_DIRS = ("artifacts",)
ROOTFS_DIFF = "rootfs-diff.tar"  # the container's files changed against its image
DELETED = "deleted.files"  # and the ones it removed (a JSON list)
DEVSHM = "devshm-checkpoint.tar"  # its /dev/shm
MAX_DELETED_BYTES = 64 << 20
ADVICE = "; restore an older checkpoint, and check who can write the repository"
FIX_FILE = "; it could not be restored: remove or change that file in the container"
STATS = "stats-dump"  # CRIU's statistics, at the export's top: kept under its own name


def unpack(export: Path, images: Path, rootfs: Callable[[], int] = lambda: -1) -> None:
    """The export's files into `images`, flat: `checkpoint/X` as X, a top-level F as podman.F.
    Anything else (volumes, links, folders we do not know) is refused: a checkpoint we could
    not restore is worse than a failed one. The rootfs diff gets the attributes Podman's
    export leaves out, read below the merged rootfs (`rootfs()` opens it: -1 if it cannot; a
    container that changed no file has no diff, and costs no `podman inspect`)."""
    with open(export, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        tar_fd = raw.fileno()
        for member in tar:
            parts = member.name.strip("/").removeprefix("./").split("/")
            if member.isdir() and len(parts) == 1 and parts[0] in (IMAGES_DIR, *EMPTY_DIRS):
                continue
            if member.isreg() and len(parts) == 1:
                target = parts[0] if parts[0] == STATS else PREFIX + parts[0]
            elif member.isreg() and len(parts) == 2 and parts[0] == IMAGES_DIR:
                target = parts[1]
            else:
                raise ContainerError(
                    f"podman's export holds {member.name!r}, which this service does not "
                    "store (a volume or bind mount in the checkpoint?); checkpoint containers "
                    "without volumes, or with `--ignore-volumes` data kept elsewhere",
                    "unsupported",
                )
            fd = os.open(
                images / target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            try:
                if target == PREFIX + ROOTFS_DIFF:
                    root = rootfs()
                    try:
                        extra = podman_rootfs.FromContainer(root) if root >= 0 else None
                        podman_rootfs.rewrite(
                            tar_fd, member.offset_data, member.size, fd, extra, advice=FIX_FILE
                        )
                    finally:
                        if root >= 0:
                            os.close(root)
                else:
                    _copy_range(tar_fd, fd, member.offset_data, member.size)
            finally:
                os.close(fd)


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    if copy_range(src, dst, offset, size) < size:
        raise ContainerError("podman's export ended early (a truncated tar)", "corrupt-image")


def pack(images: Path, export: Path, base: Callable[[], int] = lambda: -1) -> None:
    """The folder back into the tar `podman container restore --import` reads. Headers come
    from tarfile, file data is copied in the kernel (tarfile's Python copy took 0.8 s for a
    300 MB image). The tars Podman unpacks as root (the rootfs diff over the base image whose
    root `base()` opens, -1 if unknown, and /dev/shm's) and its list of files to
    delete come from the repository: they go in checked and written again."""
    checked: dict[str, Path] = {}
    try:
        beneath = podman_rootfs.Beneath(base)
        for name in (ROOTFS_DIFF, DEVSHM):  # the diff first: deleted.files is checked after it
            if (images / f"{PREFIX}{name}").is_file():
                checked[PREFIX + name] = export.parent / f"{export.name}.{name}"
                into = beneath if name == ROOTFS_DIFF else podman_rootfs.Beneath(lambda: -1)
                _check_tar(images / f"{PREFIX}{name}", checked[PREFIX + name], into)
        deleted = images / f"{PREFIX}{DELETED}"
        if deleted.is_file():
            if deleted.stat().st_size > MAX_DELETED_BYTES:
                raise podman_rootfs.refused(
                    UnsafeArchive(f"deleted.files is over {MAX_DELETED_BYTES} bytes"), ADVICE
                )
            try:
                podman_rootfs.check_deleted(deleted.read_text(errors="surrogateescape"), beneath)
            except UnsafeArchive as e:
                raise podman_rootfs.refused(e, ADVICE) from e
        _pack_members(images, export, checked)
    finally:
        for path in checked.values():
            path.unlink(missing_ok=True)


def _check_tar(stored: Path, checked: Path, beneath: podman_rootfs.Beneath) -> None:
    src = os.open(stored, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(checked, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            size = os.fstat(src).st_size
            podman_rootfs.rewrite(src, 0, size, dst, beneath=beneath, advice=ADVICE)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _pack_members(images: Path, export: Path, checked: dict[str, Path]) -> None:
    members: list[tuple[tarfile.TarInfo, str | None]] = []
    for folder in (IMAGES_DIR, *EMPTY_DIRS):
        info = tarfile.TarInfo(folder)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
        members.append((info, None))
    for entry in sorted(os.scandir(images), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False) or entry.name == "stats-restore":
            continue
        if entry.name.startswith(PREFIX) or entry.name == STATS:
            arcname = entry.name.removeprefix(PREFIX)
        else:
            arcname = f"{IMAGES_DIR}/{entry.name}"
        source = str(checked.get(entry.name, entry.path))
        st = os.stat(source, follow_symlinks=False)
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = st.st_size, st.st_mode & 0o7777, int(st.st_mtime)
        members.append((info, source))
    fd = os.open(export, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        for info, path in members:
            os.write(fd, info.tobuf(tarfile.PAX_FORMAT))
            if path is None:
                continue
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                _copy_range(src, fd, 0, info.size)
            finally:
                os.close(src)
            if info.size % tarfile.BLOCKSIZE:
                os.write(fd, bytes(tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
        os.write(fd, bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
    finally:
        os.close(fd)
