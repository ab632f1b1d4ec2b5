"""Podman's rootfs diff (`rootfs-diff.tar` in its export) with every attribute, and checked
before Podman's import unpacks it as root.

Podman 4.3 writes the diff with containers/storage's archive code, which puts only
`security.capability` and `user.*` extended attributes in it: POSIX ACLs
(`system.posix_acl_access`/`_default`) and `trusted.*` attributes are lost (rsync -aHAX shows
them gone after a restore). Its import (`archive.Untar`, the Moby-derived `createTarFile`)
sets every `SCHILY.xattr.NAME` record of a member with lsetxattr, after the owner and before
the mode (tried: an ACL and a `trusted.` attribute added to the diff come back; chmod after
the ACL keeps its mask, since the tar's group bits are the mask). So the diff is rewritten
once, at checkpoint: each member's missing attributes are read from the container's files and
added as pax records, the kernel's raw values (an ACL as its binary xattr, as the LXC archive
does), and the import applies them before the container's processes are restored. No sidecar
and no window in which the restored container runs without them.

The attributes are read from the container's merged rootfs (the host's view, without the
container's own mounts), through directory descriptors: each folder of a member's name opened
relative to its parent with O_NOFOLLOW, the attributes read without following the last
component. A container that swaps a folder for a symlink meanwhile gets that member's extra
attributes skipped, never a host file's read.

The diff comes back from the repository at restore, hostile: Podman's Untar unpacks it as
root on the host, resolving names as paths and following symlinks (tried: a member `d/x` after
a symlink member `d -> /dir` wrote the host's /dir/x; a member `var/run/x` wrote the host's
/run/x through the base image's /var/run -> /run). So it is parsed here and written again from
what was parsed (Python's and Go's tar readers never get to disagree about a header): names
normalized (no "..", NUL, over-long names); a hard link only to a regular file earlier in the
diff; every folder above a member a real folder (Beneath: one the diff makes, or one of the
base image, mounted read-only for the check); only the attribute names a rootfs has, each
value bounded (Go's reader refuses a pax header over 1 MiB). Podman's deleted.files (names it
removes after unpacking) and its /dev/shm tar get the same checks. Anything else is refused
with the member's name, as a damaged checkpoint.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any

from checkpointer.containers.base import ContainerError, copy_range
from checkpointer.containers.rootfs_archive import XATTR
from checkpointer.containers.rootfs_extract import UnsafeArchive, split
from checkpointer.criu.failures import CriuFailure

XATTR_NAME_MAX = 255  # Linux's limits on one attribute
XATTR_SIZE_MAX = 65536
MEMBER_XATTRS_MAX = 256 * 1024  # per member: well below Go's 1 MiB pax header limit
EXACT_NAMES = ("security.capability", "system.posix_acl_access", "system.posix_acl_default")
PREFIXES = ("user.", "trusted.")
NOT_PREFIXES = ("trusted.overlay.",)
MAX_DELETED = 1_000_000  # names in deleted.files  # overlayfs' own: never the container's
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO)
_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.LNKTYPE: "link",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "node",
    tarfile.BLKTYPE: "node",
    tarfile.FIFOTYPE: "node",
}

# (member's name as components, member) -> the pax xattr records to add to it.
Extra = Callable[[tuple[str, ...], tarfile.TarInfo], dict[str, str]]


def allowed(name: str) -> bool:
    """An extended attribute a container's file may carry through the diff."""
    return name in EXACT_NAMES or (name.startswith(PREFIXES) and not name.startswith(NOT_PREFIXES))


def rewrite(
    src: int,
    offset: int,
    size: int,
    dst: int,
    extra: Extra | None = None,
    beneath: Beneath | None = None,
    advice: str = "",
) -> int:
    """The diff at `offset` (`size` bytes) of `src`, checked (`beneath` says where its members
    land), written again at `dst`'s position with `extra`'s records added; returns the bytes
    written. Raises ContainerError (category "corrupt-image") naming the first member
    refused, then `advice`."""
    written = 0
    window = _Window(src, offset, size)
    beneath = beneath or Beneath(lambda: -1)
    try:
        with tarfile.open(
            fileobj=window, mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as tar:
            for member in tar:
                info, parts = _checked(member, beneath)
                if info is None:
                    continue
                if extra is not None and member.type != tarfile.LNKTYPE:
                    info.pax_headers = {**extra(parts, member), **info.pax_headers}
                    _check_xattrs(info, member)
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                os.write(dst, header)
                written += len(header)
                if info.size:
                    if copy_range(src, dst, offset + member.offset_data, info.size) < info.size:
                        raise ContainerError(
                            "the container's rootfs diff ended early (a truncated tar)",
                            CriuFailure.CORRUPT_IMAGE,
                        )
                    pad = -info.size % tarfile.BLOCKSIZE
                    os.write(dst, bytes(pad))
                    written += info.size + pad
    except tarfile.TarError as e:
        raise ContainerError(
            f"the container's rootfs diff is not a tar archive or is damaged: {e}",
            CriuFailure.CORRUPT_IMAGE,
        ) from e
    except UnsafeArchive as e:
        raise refused(e, advice) from e
    end = bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive marker
    os.write(dst, end)
    return written + len(end)


def refused(e: UnsafeArchive, advice: str = "") -> ContainerError:
    return ContainerError(
        f"the container's checkpoint was refused: {e} (Podman unpacks it as root){advice}",
        CriuFailure.CORRUPT_IMAGE,
    )


def _checked(
    member: tarfile.TarInfo, beneath: Beneath
) -> tuple[tarfile.TarInfo | None, tuple[str, ...]]:
    """The header Podman gets for `member` (only the fields a rootfs needs, the name
    normalized), or None for the rootfs' own top folder; refuses what could reach outside."""
    kind = _KINDS.get(member.type)
    if kind is None or member.issparse():
        raise _refuse(member, f"a member of type {member.type!r}, which a rootfs diff never has")
    parts = split(member.name, member)
    if not parts:
        return None, parts
    beneath.check(parts, member)
    info = tarfile.TarInfo("/".join(parts))
    info.type = member.type if member.type != tarfile.AREGTYPE else tarfile.REGTYPE
    info.mode = member.mode & 0o7777
    info.uid, info.gid = member.uid, member.gid
    info.uname = info.gname = ""
    info.mtime = int(member.mtime)
    info.size = member.size if kind == "file" else 0
    if kind == "node":
        info.devmajor, info.devminor = member.devmajor, member.devminor
    if kind == "link":
        target = split(member.linkname, member)
        if beneath.kinds.get(target) != "file":
            raise _refuse(
                member, f"a hard link to {member.linkname[:200]!r}, not a file earlier in it"
            )
        info.linkname = "/".join(target)
        kind = "file"  # a second name of that file
    elif kind == "symlink":
        if not member.linkname or "\0" in member.linkname or len(member.linkname) >= 4096:
            raise _refuse(member, "a symlink with an empty, NUL or over-long target")
        info.linkname = member.linkname
    mtime = member.pax_headers.get("mtime")
    pax = {"mtime": mtime} if mtime else {}
    pax.update({k: v for k, v in member.pax_headers.items() if k.startswith(XATTR)})
    info.pax_headers = pax
    _check_xattrs(info, member)
    beneath.made(parts, kind)
    return info, parts


class Beneath:
    """Where the names of a diff land when Podman's Untar resolves them as paths below the
    container's rootfs (following symlinks: tried, a member `var/run/x` was written to the
    host's /run/x through the image's /var/run -> /run, and a symlink member `d -> /dir`
    then a member `d/x` wrote /dir/x). A name is accepted only if each folder above it is a
    folder: a folder member of the diff (Untar replaces whatever was there by a real folder),
    or, where the diff has none, a real folder of the base image below `base` (a descriptor
    of it, from `base()`, called once if needed: -1 for an empty destination such as
    /dev/shm), or missing (Untar creates it)."""

    def __init__(self, base: Callable[[], int]) -> None:
        self.open_base = base
        self.base: int | None = None  # opened on the first name not below a folder of the diff
        self.kinds: dict[tuple[str, ...], str] = {}  # what the diff made at a name, so far
        self._in_base: dict[tuple[str, ...], str] = {}

    def check(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        for depth in range(1, len(parts)):
            above = parts[:depth]
            kind = self.kinds.get(above) or self._base_kind(above)
            if kind not in ("dir", "missing"):
                raise _refuse(member, f"it lies below {'/'.join(above)!r}, a {kind}")

    def made(self, parts: tuple[str, ...], kind: str) -> None:
        if self.kinds.get(parts) == "dir" and kind != "dir":  # a folder replaced: forget below
            for name in [n for n in self.kinds if len(n) > len(parts) and n[: len(parts)] == parts]:
                del self.kinds[name]
        self.kinds[parts] = kind

    def _base_kind(self, parts: tuple[str, ...]) -> str:
        if self.base is None:
            self.base = self.open_base()
        if self.base < 0:
            return "missing"
        kind = self._in_base.get(parts)
        if kind is None:
            fd, kind = self.base, "dir"
            try:
                for name in parts:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    if fd != self.base:
                        os.close(fd)
                    fd = child
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    raise
                kind = "missing" if e.errno == errno.ENOENT else "symlink or file of the base image"
            finally:
                if fd != self.base:
                    os.close(fd)
            self._in_base[parts] = kind
        return kind


def check_deleted(text: str, beneath: Beneath) -> None:
    """Podman's `deleted.files` (a JSON list of names it removes with RemoveAll after
    unpacking the diff), checked as the diff's names are: never a path outside the rootfs."""
    try:
        names = json.loads(text)
    except ValueError as e:
        raise UnsafeArchive(f"deleted.files is not JSON: {e}") from e
    if not isinstance(names, list) or len(names) > MAX_DELETED:
        raise UnsafeArchive(f"deleted.files is not a list of at most {MAX_DELETED} names")
    for name in names:
        entry = tarfile.TarInfo(f"deleted.files: {str(name)[:200]}")
        if not isinstance(name, str):
            raise _refuse(entry, "not a name")
        parts = split(name, entry)
        if not parts:
            raise _refuse(entry, "the rootfs itself")
        beneath.check(parts, entry)


def _check_xattrs(info: tarfile.TarInfo, member: tarfile.TarInfo) -> None:
    total = 0
    for key, value in info.pax_headers.items():
        if not key.startswith(XATTR):
            continue
        name = key[len(XATTR) :]
        if not allowed(name) or "\0" in name or len(os.fsencode(name)) > XATTR_NAME_MAX:
            raise _refuse(member, f"extended attribute {name[:80]!r}, which no rootfs carries")
        data = value.encode("utf-8", "surrogateescape")
        if len(data) > XATTR_SIZE_MAX:
            raise _refuse(member, f"extended attribute {name} over {XATTR_SIZE_MAX} bytes")
        if name.startswith("system.posix_acl_") and not _acl_shaped(data):
            raise _refuse(member, f"extended attribute {name} that is not an ACL")
        if name == "system.posix_acl_default" and info.type != tarfile.DIRTYPE:
            raise _refuse(member, "a default ACL on something else than a folder")
        total += len(name) + len(data)
    if total > MEMBER_XATTRS_MAX:
        raise _refuse(member, f"extended attributes over {MEMBER_XATTRS_MAX} bytes in all")


def _acl_shaped(data: bytes) -> bool:
    """The kernel's xattr form of an ACL: version 2, then 8-byte entries."""
    return len(data) >= 4 and (len(data) - 4) % 8 == 0 and data[:4] == b"\x02\x00\x00\x00"


def _refuse(member: tarfile.TarInfo, why: str) -> UnsafeArchive:
    name = member.name if len(member.name) <= 200 else member.name[:200] + "..."
    return UnsafeArchive(f"member {name!r}: {why}")


class FromContainer:
    """`Extra` for a checkpoint: the attributes of the container's file, read below the
    merged rootfs `root` (a descriptor of it), that the diff lacks and a rootfs may carry."""

    def __init__(self, root: int) -> None:
        self.root = root

    def __call__(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> dict[str, str]:
        fd = self.root
        try:
            for name in parts[:-1]:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if fd != self.root:
                    os.close(fd)
                fd = child
            return _read_xattrs(f"/proc/self/fd/{fd}/{parts[-1]}", "/".join(parts))
        except OSError as e:
            if e.errno in _GONE:  # removed or swapped since Podman's export: skipped
                return {}
            raise
        finally:
            if fd != self.root:
                os.close(fd)


def _read_xattrs(path: str, shown: str) -> dict[str, str]:
    """Every allowed attribute of `path` (not following its last component) as pax records,
    in name order (the same attributes are the same bytes in every checkpoint)."""
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if allowed(n))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    records: dict[str, str] = {}
    total = 0
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
        total += len(name) + len(value)
        if total > MEMBER_XATTRS_MAX:
            raise ContainerError(
                f"the container's file /{shown} has more than {MEMBER_XATTRS_MAX} bytes of "
                "extended attributes, more than a restore can carry; remove some of them",
                CriuFailure.ROOTFS,
            )
        records[XATTR + name] = value.decode("utf-8", "surrogateescape")
    return records


class _Window(io.RawIOBase):
    """`size` bytes of descriptor `fd` from `offset`, as a read-only file (the diff inside
    Podman's export, read in place)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.start, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        want = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, want, self.start + self.pos) if want else b""
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)
