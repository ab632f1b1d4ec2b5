"""Unpacking a rootfs archive (rootfs_archive.py's format) as root, with every attribute, and
never anywhere but inside the destination, whatever the archive says.

The archive comes back from the repository: the daemon runs as root, so a member that wrote
through a link would overwrite any host file (seen with tarfile's `tar_filter`: a hard link
`x -> /etc/shadow` then a regular file `x`). Why not GNU tar or tarfile's extractall: both
resolve each member's name as a path, following symlinks the archive itself created in some
cases, and checking an archive with one parser before unpacking it with another invites the
two to disagree. So here every name is resolved one component at a time, each folder opened
relative to its parent's descriptor with O_NOFOLLOW (a symlink at any depth fails the open);
files are created with O_EXCL (nothing is replaced or written through); a hard link may only
name a file or node this extraction created before it (never a symlink or folder, never a
name outside); links are made with linkat without following. Anything else is refused with
the member's name. The destination must be empty and private to the caller.

Attributes are applied in the order the kernel needs: owner, then mode (chown clears setuid and
setgid), then extended attributes (chown clears `security.capability`; an ACL sets the group
bits from its mask), then times, folders' times last (their entries change them). A hard link
member changes nothing of the inode it names: the inode's attributes came with its first name
(tarfile chmods it again with the link's mode, which is how a 6755 busybox came back 0755).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path

from checkpointer.containers.base import copy_range
from checkpointer.containers.rootfs_archive import PATH_MAX, XATTR

NAME_MAX = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODES = {
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


class UnsafeArchive(Exception):
    """The archive tries to write outside its destination, or holds what a rootfs never does."""


def extract(archive: Path, dest: Path) -> int:
    """Unpack `archive` into `dest` (an empty folder), owners (numeric), modes (setuid
    included), extended attributes, ACLs, links, nodes and times as archived; returns the
    number of members. Symlinks are created as they are (an absolute target means the
    container's root) and never followed."""
    root = os.open(dest, _DIR_FLAGS)
    try:
        if os.listdir(root):
            raise UnsafeArchive(f"{dest} is not empty: a rootfs is only unpacked into a new folder")
        with open(archive, "rb") as raw:
            try:
                with tarfile.open(
                    fileobj=raw, mode="r:", encoding="utf-8", errors="surrogateescape"
                ) as tar:
                    unpacker = _Unpacker(root, raw.fileno())
                    try:
                        for member in tar:
                            unpacker.add(member)
                        unpacker.finish()
                    finally:
                        unpacker.close()
                    return unpacker.count
            except tarfile.TarError as e:
                raise UnsafeArchive(
                    f"{archive.name} is not a tar archive or is damaged: {e}"
                ) from e
    finally:
        os.close(root)


def _refuse(member: tarfile.TarInfo, why: str) -> UnsafeArchive:
    name = member.name if len(member.name) <= 200 else member.name[:200] + "..."
    return UnsafeArchive(f"member {name!r}: {why}; the archive was refused")


def split(name: str, member: tarfile.TarInfo) -> tuple[str, ...]:
    """A member's name as components below the destination. A leading "/" is dropped (as tar
    does: the container's root); "..", NUL and over-long names are refused."""
    if "\0" in name:
        raise _refuse(member, "a name with a NUL byte")
    if len(os.fsencode(name)) >= PATH_MAX:
        raise _refuse(member, f"a name longer than PATH_MAX ({PATH_MAX} bytes)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(member, "'..' in a name: outside the destination")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise _refuse(member, f"a name component longer than NAME_MAX ({NAME_MAX} bytes)")
    return parts


class _Unpacker:
    def __init__(self, root: int, archive_fd: int) -> None:
        self.root = root
        self.archive_fd = archive_fd
        self.kinds: dict[tuple[str, ...], str] = {(): "dir"}  # what this extraction made
        self.implicit: set[tuple[str, ...]] = set()  # folders made for a member below them
        self.dir_times: list[tuple[tuple[str, ...], int]] = []
        self.count = 0
        self._cached: tuple[tuple[str, ...], int] | None = None

    def add(self, member: tarfile.TarInfo) -> None:
        parts = split(member.name, member)
        if member.isdir():
            self._dir(member, parts)
        elif not parts:
            raise _refuse(member, "not a folder, yet it names the destination itself")
        elif parts in self.kinds and parts not in self.implicit:
            raise _refuse(member, "a second member of the same name (it would replace the first)")
        elif parts in self.implicit:
            raise _refuse(member, "a name extracted as a folder before")
        elif member.islnk():
            self._hard_link(member, parts)
        elif member.issym():
            self._symlink(member, parts)
        elif member.isreg() and not member.issparse():
            self._file(member, parts)
        elif member.type in _NODES:
            self._node(member, parts)
        else:
            raise _refuse(member, f"tar member type {member.type!r} is never part of a rootfs")
        self.count += 1

    def finish(self) -> None:
        """Folders' times, deepest first: creating their entries changed them."""
        for parts, ns in sorted(self.dir_times, key=lambda t: -len(t[0])):
            fd = self._open_dir(parts, None)
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _parent(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> int:
        """The folder that holds `parts`, opened component by component (kept open for the
        next member: a folder's entries come one after another)."""
        folder = parts[:-1]
        if self._cached is not None and self._cached[0] == folder:
            return self._cached[1]
        fd = self._open_dir(folder, member)
        if self._cached is not None:
            os.close(self._cached[1])
        self._cached = (folder, fd)
        return fd

    def _open_dir(self, parts: tuple[str, ...], member: tarfile.TarInfo | None) -> int:
        """The folder `parts` as a new descriptor the caller closes. A missing folder is made
        (0755, root's) when a member below it needs it; a symlink or anything but a folder on
        the way is refused."""
        fd = os.dup(self.root)
        try:
            for i, part in enumerate(parts):
                here = parts[: i + 1]
                kind = self.kinds.get(here)
                if kind is not None and kind != "dir" and member is not None:
                    raise _refuse(member, f"its folder {'/'.join(here)!r} is a {kind} member")
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if member is None:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self.kinds[here] = "dir"
                    self.implicit.add(here)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR) and member is not None:
                        raise _refuse(member, f"{'/'.join(here)!r} is not a folder") from e
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _dir(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        if parts in self.kinds and parts not in self.implicit and parts != ():
            raise _refuse(member, "a second member of the same name")
        if parts:
            parent = self._parent(parts, member)
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                if parts not in self.implicit:
                    raise _refuse(member, "a second member of the same name") from None
            self.implicit.discard(parts)
            self.kinds[parts] = "dir"
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        else:
            fd = os.dup(self.root)
        try:
            os.fchown(fd, member.uid, member.gid)
            os.chmod(fd, stat.S_IMODE(member.mode))
            _set_xattrs(fd, member)
        finally:
            os.close(fd)
        self.dir_times.append((parts, _mtime_ns(member)))

    def _file(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        parent = self._parent(parts, member)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        self.kinds[parts] = "file"
        try:
            if copy_range(self.archive_fd, fd, member.offset_data, member.size) < member.size:
                raise _refuse(member, "its data runs past the end of the archive")
            os.fchown(fd, member.uid, member.gid)
            os.chmod(fd, stat.S_IMODE(member.mode))
            _set_xattrs(fd, member)
            ns = _mtime_ns(member)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _node(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        parent = self._parent(parts, member)
        kind = _NODES[member.type]
        device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        os.mknod(parts[-1], kind | 0o600, device, dir_fd=parent)
        self.kinds[parts] = "node"
        # The node's own inode through an O_PATH descriptor: never opened (a device open has
        # effects), attributes set through /proc/self/fd, which names exactly that inode.
        fd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
                raise _refuse(member, "replaced while it was being unpacked")
            path = f"/proc/self/fd/{fd}"
            os.chown(path, member.uid, member.gid)
            os.chmod(path, stat.S_IMODE(member.mode))
            _set_xattrs(path, member)
            ns = _mtime_ns(member)
            os.utime(path, ns=(ns, ns))
        finally:
            os.close(fd)

    def _symlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        target = member.linkname
        if not target or "\0" in target or len(os.fsencode(target)) >= PATH_MAX:
            raise _refuse(member, "a symlink with an empty, NUL-holding or over-long target")
        parent = self._parent(parts, member)
        leaf = parts[-1]
        os.symlink(target, leaf, dir_fd=parent)
        self.kinds[parts] = "symlink"
        os.chown(leaf, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        _set_xattrs(f"/proc/self/fd/{parent}/{leaf}", member, follow=False)
        ns = _mtime_ns(member)
        os.utime(leaf, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def _hard_link(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        target = split(member.linkname, member)
        kind = self.kinds.get(target) if target not in self.implicit else "dir"
        if kind not in ("file", "node"):
            what = "nothing extracted before it" if kind is None else f"a {kind}"
            raise _refuse(
                member, f"a hard link to {member.linkname!r}, which is {what}: only files "
                "and nodes unpacked earlier in the same archive may be linked to"
            )  # fmt: skip
        source = self._open_dir(target[:-1], member)
        try:
            parent = self._parent(parts, member)
            # linkat without AT_SYMLINK_FOLLOW: the name itself, which this extraction made.
            os.link(
                target[-1], parts[-1], src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False
            )
        finally:
            os.close(source)
        self.kinds[parts] = kind


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime to the nanosecond: from its pax record when it has one (tarfile's
    float loses the last digits, and rsync compares them)."""
    text = member.pax_headers.get("mtime")
    if text:
        try:
            negative = text.startswith("-")
            whole, _, frac = text.lstrip("-").partition(".")
            ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
            return -ns if negative else ns
        except ValueError:
            pass
    return int(member.mtime) * 1_000_000_000


def _set_xattrs(target: int | str, member: tarfile.TarInfo, follow: bool = True) -> None:
    for key, value in sorted(member.pax_headers.items()):
        if not key.startswith(XATTR):
            continue
        name = key[len(XATTR) :]
        if not name or "\0" in name:
            raise _refuse(member, f"an extended attribute with a bad name {key!r}")
        data = value.encode("utf-8", "surrogateescape")
        try:
            if isinstance(target, int):
                os.setxattr(target, name, data)
            else:
                os.setxattr(target, name, data, follow_symlinks=follow)
        except OSError as e:
            raise _refuse(member, f"extended attribute {name} cannot be set here: {e}") from e
