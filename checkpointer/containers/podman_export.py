"""Podman's export tar, flat in a checkpoint's folder and packed again for its import.

The export is a tar of CRIU's images (`checkpoint/`) and Podman's own files (`config.dump`,
`spec.dump`, `network.status`, `rootfs-diff.tar`, ...). Inside a tar, files sit on 512-byte
boundaries, so the tar itself would defeat the repository's 4 KiB page dedup: the folder stored
is the export unpacked, CRIU's images as they are and Podman's files prefixed with `podman.`;
a restore packs them into a tar again, the tars Podman unpacks as root checked first
(podman_rootfs.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from checkpointer.containers import podman_rootfs
from checkpointer.containers.base import ContainerError, copy_range
from checkpointer.containers.rootfs_extract import UnsafeArchive
from checkpointer.criu.failures import CriuFailure

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
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
log = logging.getLogger(__name__)


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
                    CriuFailure.UNSUPPORTED,
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
        raise ContainerError(
            "podman's export ended early (a truncated tar)", CriuFailure.CORRUPT_IMAGE
        )


class Packed:
    """The tar Podman's import reads, ready to be written as often as Podman opens it: its
    headers, and a descriptor of each member's data (the checked tars in unlinked
    temporaries, CRIU's images as they are). Nothing is copied until it is written."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, int | None]] = []

    def write(self, fd: int) -> None:
        """The whole tar at `fd`'s position: a file, or a pipe Podman reads as it goes."""
        for info, src in self.members:
            os.write(fd, info.tobuf(tarfile.PAX_FORMAT))
            if src is None:
                continue
            _copy_range(src, fd, 0, info.size)
            if info.size % tarfile.BLOCKSIZE:
                os.write(fd, bytes(tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
        os.write(fd, bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker

    def close(self) -> None:
        for _, src in self.members:
            if src is not None:
                os.close(src)
        self.members = []

    def __enter__(self) -> Packed:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def pack(images: Path, export: Path, base: Callable[[], int] = lambda: -1) -> None:
    """The folder back into the tar file `export` (see packed())."""
    with packed(images, export.parent, base) as tar:
        fd = os.open(export, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            tar.write(fd)
        finally:
            os.close(fd)


def packed(images: Path, scratch: Path, base: Callable[[], int] = lambda: -1) -> Packed:
    """The folder as the tar `podman container restore --import` reads. Headers come
    from tarfile, file data is copied in the kernel (tarfile's Python copy took 0.8 s for a
    300 MB image). The tars Podman unpacks as root (the rootfs diff over the base image whose
    root `base()` opens, -1 if unknown, and /dev/shm's) and its list of files to
    delete come from the repository: they go in checked and written again (in temporaries
    in `scratch`, unlinked as soon as they are made)."""
    checked: dict[str, int] = {}
    try:
        beneath = podman_rootfs.Beneath(base)
        for name in (ROOTFS_DIFF, DEVSHM):  # the diff first: deleted.files is checked after it
            if (images / f"{PREFIX}{name}").is_file():
                into = beneath if name == ROOTFS_DIFF else podman_rootfs.Beneath(lambda: -1)
                checked[PREFIX + name] = _check_tar(images / f"{PREFIX}{name}", scratch, into)
        deleted = images / f"{PREFIX}{DELETED}"
        if deleted.is_file():
            if deleted.stat().st_size > MAX_DELETED_BYTES:
                raise podman_rootfs.refused(
                    UnsafeArchive(f"deleted.files is over {MAX_DELETED_BYTES} bytes"), ADVICE
                )
            data = deleted.read_bytes()
            try:
                podman_rootfs.check_deleted(data.decode(errors="surrogateescape"), beneath)
            except UnsafeArchive as e:
                raise podman_rootfs.refused(e, ADVICE) from e
            checked[PREFIX + DELETED] = _temporary(scratch)  # Podman gets the bytes checked
            os.write(checked[PREFIX + DELETED], data)
        tar = Packed()
        tar.members = _members(images, checked)  # takes the descriptors it uses out of checked
        return tar
    finally:
        for fd in checked.values():
            os.close(fd)


def _check_tar(stored: Path, scratch: Path, beneath: podman_rootfs.Beneath) -> int:
    """A descriptor of `stored` checked and written again, in an unlinked temporary."""
    src = os.open(stored, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = _temporary(scratch)
        try:
            size = os.fstat(src).st_size
            podman_rootfs.rewrite(src, 0, size, dst, beneath=beneath, advice=ADVICE)
        except BaseException:
            os.close(dst)
            raise
        return dst
    finally:
        os.close(src)


def _temporary(folder: Path) -> int:
    """A file in `folder` with no name, nothing to remove even if the daemon is killed."""
    try:
        return os.open(folder, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
    name = folder / f".podman-import-{os.getpid()}-{threading.get_ident()}"  # no O_TMPFILE
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.unlink(name)
    return fd


def _members(images: Path, checked: dict[str, int]) -> list[tuple[tarfile.TarInfo, int | None]]:
    members: list[tuple[tarfile.TarInfo, int | None]] = []
    for folder in (IMAGES_DIR, *EMPTY_DIRS):
        info = tarfile.TarInfo(folder)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
        members.append((info, None))
    try:
        for entry in sorted(os.scandir(images), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False) or entry.name == "stats-restore":
                continue
            if entry.name.startswith(PREFIX) or entry.name == STATS:
                arcname = entry.name.removeprefix(PREFIX)
            else:
                arcname = f"{IMAGES_DIR}/{entry.name}"
            src = checked.pop(entry.name, None)
            if src is None:
                src = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            members.append((tarfile.TarInfo(arcname), src))
            st = os.fstat(src)
            info = members[-1][0]
            info.size, info.mode, info.mtime = st.st_size, st.st_mode & 0o7777, int(st.st_mtime)
    except BaseException:
        for _, fd in members:
            if fd is not None:
                os.close(fd)
        raise
    return members


@contextmanager
def served(
    tar: Packed, fifo: Path, ready: Callable[[], bool] = lambda: True, grace: float = 5.0
) -> Iterator[Path]:
    """`tar` at the FIFO `fifo`, written each time a reader opens it, for as long as the
    context lasts: Podman 4.3's import opens its input three times (the config, then the
    rest, by path), and a pipe it reads as it goes costs no 300 MB copy into a tar file
    first. The first write waits for `ready()` (the dead container's `podman rm`, run
    meanwhile): False ends the stream there, and Podman's import fails on the empty tar.
    Podman's tar reader closes the pipe once it has read the end-of-archive marker; the next
    open must not join a pipe the last reader still holds (it would read the stream's
    rest), so the writer waits for that close, `grace` seconds at most (a reader that
    waits for the end of the file gets it then)."""
    os.mkfifo(fifo, 0o600)
    stop = threading.Event()
    failed: list[Exception] = []

    def serve() -> None:
        while True:
            fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)  # waits for a reader
            try:
                if stop.is_set():
                    return
                if failed or not ready():
                    continue  # closed at once: the reader gets no tar, and Podman fails
                with suppress(OSError):
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)  # fewer switches to Podman
                t0 = time.monotonic()
                tar.write(fd)
                log.debug("%s read by Podman in %.3fs", fifo.name, time.monotonic() - t0)
                _wait_closed(fd, stop, grace)  # this reader is done before the next opens
            except BrokenPipeError:
                continue  # the reader stopped early: Podman fails, or opens it again
            except Exception as e:  # raised to the caller once Podman is done
                failed.append(e)
            finally:
                os.close(fd)

    thread = threading.Thread(target=serve, name=f"podman import {fifo.name}", daemon=True)
    thread.start()
    try:
        yield fifo
    finally:
        stop.set()
        # A reader of ours lets the thread's open() return, to see `stop`.
        wake = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            thread.join()
        finally:
            os.close(wake)
            fifo.unlink(missing_ok=True)
        if failed:  # the cause, rather than Podman's word on a tar that ended early
            raise failed[0]


def _wait_closed(fd: int, stop: threading.Event, grace: float) -> None:
    """Until the reader of pipe `fd` has closed it (POLLERR: no reader left)."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP come whatever is asked
    deadline = time.monotonic() + grace
    while not stop.is_set() and time.monotonic() < deadline and not poller.poll(50):
        pass
