"""A container's root filesystem as one tar file whose file contents start on 4 KiB boundaries.

The repository cuts every file into 4 KiB chunks from offset 0 and stores each distinct chunk
once. In a plain tar a file's data starts wherever the previous member ended (512-byte
blocks), so one file that grows by a byte shifts every later file off its old chunk
boundaries and the whole rest of the rootfs is stored again. Here each regular file's data is
preceded by padding (a pax global header, which every tar reader skips) that puts it on a
4 KiB boundary: an unchanged file is the same chunks in every checkpoint, wherever it lies in
the archive, and only changed files and their headers cost storage.

Extraction treats the archive as hostile input (it comes back from the repository): no member
may land outside the destination or be written through a link, whatever its name says.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

ALIGN = 4096
_BLOCK = tarfile.BLOCKSIZE


def write(root: Path, archive: Path) -> int:
    """Archive the tree under `root` (not following symlinks, not crossing into other
    filesystems mounted below it); returns the number of members."""
    dev = root.stat().st_dev
    count = 0
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, arcname in _walk(root, dev):
            info = tar.gettarinfo(str(path), arcname)
            if info is None:  # a socket: nothing to archive
                continue
            info.uname = info.gname = ""  # numeric ids only: names differ between hosts
            if info.isreg():
                _pad(tar, info)
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            count += 1
    return count


def _walk(root: Path, dev: int) -> Iterator[tuple[Path, str]]:
    """Every entry below `root`, in name order (a deterministic archive dedups best)."""
    stack = [(root, ".")]
    while stack:
        folder, arc = stack.pop()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        for entry in entries:
            name = f"{arc}/{entry.name}" if arc != "." else entry.name
            yield Path(entry.path), name
        for entry in entries:
            if (
                entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_dev == dev
            ):
                stack.append(
                    (Path(entry.path), f"{arc}/{entry.name}" if arc != "." else entry.name)
                )


def _pad(tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
    """Write a pax global header sized so that `info`'s data starts on an ALIGN boundary."""
    header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
    gap = (-(tar.offset + header)) % ALIGN
    if gap == 0:
        return
    body = gap - _BLOCK  # the padding member's own header takes one block
    pad = tarfile.TarInfo("pad")
    pad.type = tarfile.XGLTYPE
    data = _comment_record(body)
    pad.size = len(data)
    assert tar.fileobj is not None
    buf = pad.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors)
    tar.fileobj.write(buf + data)
    tar.offset += len(buf) + len(data)


def _comment_record(size: int) -> bytes:
    """A pax record `"<len> comment=xxx\\n"` exactly `size` bytes long (a multiple of 512, or
    0). Its length field counts its own digits."""
    if size == 0:
        return b""
    digits = len(str(size))
    filler = size - digits - len(" comment=\n")
    return f"{size} comment={'x' * filler}\n".encode()


class UnsafeArchive(Exception):
    """The archive tries to write outside its destination, or holds what a rootfs never does."""


def extract(archive: Path, dest: Path) -> None:
    """Unpack into `dest` (which must be empty), owners and modes (setuid included) as
    archived. Symlinks are kept as they are (an absolute target means the container's root);
    nothing is ever written through one."""
    with tarfile.open(archive, "r:") as tar:
        try:
            tar.extractall(dest, numeric_owner=True, filter=_member_filter)
        except tarfile.FilterError as e:
            raise UnsafeArchive(f"{archive.name}: {e}") from e


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    if member.issym():
        # Check where the link itself goes, not what it points at: its target is read inside
        # the container, relative to the container's root.
        tarfile.tar_filter(member.replace(linkname="", deep=False), dest)
        return member
    checked = tarfile.tar_filter(member, dest)  # refuses ../, absolute names, links out
    if member.ischr() or member.isblk() or member.isfifo() or member.isreg() or member.isdir():
        return checked.replace(mode=stat.S_IMODE(member.mode), deep=False)
    return checked
