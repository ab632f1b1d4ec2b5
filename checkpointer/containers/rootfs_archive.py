"""A container's root filesystem as one tar file whose file contents start on 4 KiB boundaries,
every attribute of every file in it.

Why a writer of our own and not GNU tar or libarchive: the repository cuts every file into
4 KiB chunks from offset 0 and stores each distinct chunk once. In a plain tar a file's data
starts wherever the previous member ended (512-byte blocks), so one file that grows by a byte
shifts every later file off its old chunk boundaries and the whole rest of the rootfs is
stored again; neither tool can align member data. Here each regular file's data is preceded by
padding (a pax global header, which every tar reader skips) that puts it on a 4 KiB boundary:
an unchanged file is the same chunks in every checkpoint, wherever it lies in the archive, and
an unchanged rootfs is the same bytes (nothing new stored after the first checkpoint).

The format stays the one GNU tar, bsdtar and star read and write, so the archive can be checked
or unpacked by hand (`tar --xattrs --xattrs-include='*' --numeric-owner -xpf lxc.rootfs.tar`):
pax headers with numeric owners only (names differ between hosts), `mtime` to the nanosecond,
and every extended attribute as a `SCHILY.xattr.NAME` record, byte for byte. POSIX ACLs and
file capabilities are extended attributes to the kernel (`system.posix_acl_access`,
`system.posix_acl_default`, `security.capability`): copied as the kernel stores them, they need
no per-attribute code here (GNU tar's `--acls` converts ACLs to text and back through libacl;
the raw value is what `getfattr -d -m -` shows and what the kernel takes back). A second name of
an inode is a hard link member carrying no attributes of its own (the inode has them).

The walk reads the tree through directory file descriptors: each folder is opened relative to
its parent's descriptor with O_NOFOLLOW and everything in it is read relative to that
descriptor, so a running container that swaps a folder for a symlink while it is archived
gets that entry skipped, never the host's files behind the symlink archived. It does not cross
into other filesystems mounted below the rootfs.

Unpacking is rootfs_extract.py's: the archive comes back from the repository and is treated
as hostile there.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Iterator

from checkpointer.containers.base import ContainerError, copy_range
from checkpointer.criu.failures import CriuFailure

ALIGN = 4096
XATTR = "SCHILY.xattr."  # the pax record GNU tar, bsdtar and star use for extended attributes
PATH_MAX = 4096  # Linux's: a longer name cannot be created again by path
MAX_DEPTH = 256  # folders open at once during the walk (one descriptor per level)
_BLOCK = tarfile.BLOCKSIZE
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO)  # removed or swapped meanwhile


def write(root: os.PathLike[str] | str, archive: os.PathLike[str] | str) -> int:
    """Archive the tree under `root`, its top folder as member ".", without following any
    symlink or crossing into other filesystems mounted below it; returns the number of
    members. File data is copied in the kernel (through tarfile's Python copy a 100 MB rootfs
    took 0.8 s)."""
    root_fd = os.open(root, _DIR_FLAGS)
    out = -1
    try:
        out = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        writer = _Writer(out)
        writer.add_dir(root_fd, ".", os.fstat(root_fd))
        for dir_fd, name, arcname, st in _walk(root_fd):
            writer.add(dir_fd, name, arcname, st)
        writer.emit(bytes(2 * _BLOCK))  # the end-of-archive marker
        return writer.count
    finally:
        if out >= 0:
            os.close(out)
        os.close(root_fd)


class _Writer:
    def __init__(self, out: int) -> None:
        self.out = out
        self.offset = 0
        self.count = 0
        self.links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first name archived

    def emit(self, data: bytes) -> None:
        os.write(self.out, data)
        self.offset += len(data)

    def add(self, dir_fd: int, name: str, arcname: str, st: os.stat_result) -> None:
        if len(os.fsencode(arcname)) >= PATH_MAX:
            raise ContainerError(
                f"the container's rootfs holds a path longer than PATH_MAX ({arcname[:80]}...): "
                "it could not be restored; remove it from the container",
                CriuFailure.ROOTFS,
            )
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in _GONE:
                    return
                raise
            try:
                self.add_dir(fd, arcname, os.fstat(fd))
            finally:
                os.close(fd)
        elif stat.S_ISREG(mode):
            self._add_file(dir_fd, name, arcname)
        elif stat.S_ISLNK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            if self._linked(st, arcname):
                return
            info = _info(arcname, st, _xattrs(f"/proc/self/fd/{dir_fd}/{name}"))
            if stat.S_ISLNK(mode):
                try:
                    info.linkname = os.readlink(name, dir_fd=dir_fd)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINVAL):  # gone, or no longer a symlink
                        return
                    raise
            self._header(info)
        # Sockets are not archived: they are recreated by whoever listens on them.

    def add_dir(self, fd: int, arcname: str, st: os.stat_result) -> None:
        self._header(_info(arcname, st, _xattrs(fd)))

    def _add_file(self, dir_fd: int, name: str, arcname: str) -> None:
        fd = _open_regular(dir_fd, name)
        if fd < 0:
            return
        try:
            st = os.fstat(fd)  # the file opened, not the name looked at before
            if self._linked(st, arcname):
                return
            info = _info(arcname, st, _xattrs(fd))
            header = _header_bytes(info)
            if info.size:
                self.emit(_padding(self.offset + len(header)))
            self.emit(header)
            done = copy_range(fd, self.out, 0, info.size)
            if done < info.size:  # it shrank while being archived: keep the size the header says
                os.write(self.out, bytes(info.size - done))
            self.offset += info.size
            if info.size % _BLOCK:
                self.emit(bytes(_BLOCK - info.size % _BLOCK))
            self.count += 1
        finally:
            os.close(fd)

    def _linked(self, st: os.stat_result, arcname: str) -> bool:
        """A second name of an inode archived already: a hard link member, no attributes."""
        if st.st_nlink < 2:
            return False
        first = self.links.setdefault((st.st_dev, st.st_ino), arcname)
        if first == arcname:
            return False
        info = tarfile.TarInfo(arcname)
        info.type, info.linkname, info.mode = tarfile.LNKTYPE, first, 0
        self._header(info)
        return True

    def _header(self, info: tarfile.TarInfo) -> None:
        self.emit(_header_bytes(info))
        self.count += 1


def _open_regular(dir_fd: int, name: str) -> int:
    """`name` opened for reading if it is still a regular file, else -1. Looked at through an
    O_PATH descriptor first, and only then opened: a running container could swap the file for
    a device node (opening /dev/watchdog as root arms the host's watchdog) or a FIFO (blocks)."""
    try:
        path_fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _GONE:
            return -1
        raise
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return -1
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def _header_bytes(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _info(arcname: str, st: os.stat_result, xattrs: dict[str, str]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    mode = st.st_mode
    info.type = (
        tarfile.DIRTYPE
        if stat.S_ISDIR(mode)
        else tarfile.SYMTYPE
        if stat.S_ISLNK(mode)
        else tarfile.CHRTYPE
        if stat.S_ISCHR(mode)
        else tarfile.BLKTYPE
        if stat.S_ISBLK(mode)
        else tarfile.FIFOTYPE
        if stat.S_ISFIFO(mode)
        else tarfile.REGTYPE
    )
    info.mode = stat.S_IMODE(mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""  # numeric ids only: names differ between hosts
    info.size = st.st_size if info.type == tarfile.REGTYPE else 0
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    info.mtime = st.st_mtime_ns // 1_000_000_000
    info.pax_headers = {"mtime": format_ns(st.st_mtime_ns), **xattrs}
    return info


def format_ns(ns: int) -> str:
    """Nanoseconds as a pax time ("1700000000.123456789"), exact (a float is not)."""
    seconds, frac = divmod(abs(ns), 1_000_000_000)
    return f"{'-' if ns < 0 else ''}{seconds}.{frac:09d}"


def _xattrs(target: int | str) -> dict[str, str]:
    """Every extended attribute of `target` (a descriptor, or a /proc/self/fd/N/NAME path read
    without following its last component), as pax records in name order (the same attributes
    are the same bytes in every checkpoint)."""
    nofollow = isinstance(target, str)  # a descriptor is the file itself
    try:
        names = sorted(os.listxattr(target, follow_symlinks=not nofollow))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT, errno.EPERM):
            return {}
        raise
    records = {}
    for name in names:
        try:
            value = os.getxattr(target, name, follow_symlinks=not nofollow)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOENT):  # removed meanwhile
                continue
            raise
        records[XATTR + name] = value.decode("utf-8", "surrogateescape")
    return records


def _walk(root_fd: int) -> Iterator[tuple[int, str, str, os.stat_result]]:
    """(folder's descriptor, name, archive name, lstat) of every entry below the root, a
    folder's entries in name order before what lies below them (a deterministic archive dedups
    best). One descriptor is open per level; a folder that is no longer a folder when it is
    opened (swapped for a symlink) is skipped."""
    dev = os.fstat(root_fd).st_dev
    stack: list[tuple[int, str, list[str]]] = []
    fd, arc = root_fd, ""
    try:
        while True:
            subdirs = []
            for name in sorted(os.listdir(fd)):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield fd, name, f"{arc}/{name}" if arc else name, st
                if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                    subdirs.append(name)
            subdirs.reverse()  # popped from the end: name order
            stack.append((fd, arc, subdirs))
            fd = -1
            while stack and fd < 0:
                parent, parent_arc, pending = stack[-1]
                if not pending:
                    stack.pop()
                    if parent != root_fd:
                        os.close(parent)
                    continue
                name = pending.pop()
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=parent)
                except OSError as e:
                    if e.errno in _GONE:
                        continue
                    raise
                if os.fstat(child).st_dev != dev:  # a mount point: its own filesystem
                    os.close(child)
                    continue
                if len(stack) >= MAX_DEPTH:
                    os.close(child)
                    raise ContainerError(
                        f"the container's rootfs is nested deeper than {MAX_DEPTH} folders "
                        f"({parent_arc}/{name}); remove that tree from the container",
                        CriuFailure.ROOTFS,
                    )
                fd, arc = child, f"{parent_arc}/{name}" if parent_arc else name
            if fd < 0:
                return
    finally:
        for parent, _, _ in stack:
            if parent != root_fd:
                os.close(parent)
        if fd >= 0 and fd != root_fd:
            os.close(fd)


def _padding(end_of_header: int) -> bytes:
    """A pax global header sized so that the data after a header ending at `end_of_header`
    (once this padding is in front of it) starts on an ALIGN boundary; b"" if it already
    does."""
    gap = (-end_of_header) % ALIGN
    if gap == 0:
        return b""
    pad = tarfile.TarInfo("pad")
    pad.type = tarfile.XGLTYPE
    data = _comment_record(gap - _BLOCK)  # the padding member's own header takes one block
    pad.size = len(data)
    return pad.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data


def _comment_record(size: int) -> bytes:
    """A pax record `"<len> comment=xxx\\n"` exactly `size` bytes long (a multiple of 512, or
    0). Its length field counts its own digits."""
    if size == 0:
        return b""
    digits = len(str(size))
    filler = size - digits - len(" comment=\n")
    return f"{size} comment={'x' * filler}\n".encode()
