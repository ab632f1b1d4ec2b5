"""Copying a range of one open file into another in the kernel, across filesystems too.

One helper for every copy of image bytes between local files: the rebuild of a checkpoint from
a seed folder (storage/rebuild.py) and the disk images (checkpointer/engine/disk_images.py).
`copy_file_range` is the fast path, but it refuses to cross filesystems (EXDEV: Linux >= 5.19
again, and always from tmpfs), and a kept image lives on tmpfs while a rebuild or a disk slot
is on disk whenever /dev/shm lacks room. A copy loop without the fallback then fails, and its
caller quietly downloads every chunk instead (seen in a rollback: issue 28). So a refusal
falls back to sendfile (still in the kernel), and a refusal of that to pread and pwrite.
"""

from __future__ import annotations

import errno
import os

# copy_file_range and sendfile move at most ~2 GiB per call (MAX_RW_COUNT): ask for 1 GiB.
_STEP = 1 << 30
_BUFFER = 1 << 20  # the read/write fallback's buffer

# What copy_file_range (or sendfile) says when it cannot do this pair of files, as opposed to a
# real I/O error: another filesystem (EXDEV), a kernel or filesystem without it (ENOSYS,
# EOPNOTSUPP), a file type it does not take (EINVAL).
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def copy_range(src: int, dst: int, length: int, src_offset: int, dst_offset: int) -> int:
    """Copy `length` bytes at `src_offset` of `src` to `dst_offset` of `dst` (both regular
    files open by descriptor); returns `length`. copy_file_range where the kernel can, else
    sendfile (which moves `dst`'s file position: callers pass offsets, never rely on it), else
    pread and pwrite. Raises OSError if `src` ends early or on a real I/O error."""
    done = 0
    step = _copy_file_range
    while done < length:
        at_src, at_dst = src_offset + done, dst_offset + done
        try:
            n = step(src, dst, min(length - done, _STEP), at_src, at_dst)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY or step is _read_write:
                raise
            step = _sendfile if step is _copy_file_range else _read_write
            continue
        if n == 0:
            raise OSError(f"the source ended {length - done} bytes early (at {at_src})")
        done += n
    return done


def _copy_file_range(src: int, dst: int, n: int, at_src: int, at_dst: int) -> int:
    return os.copy_file_range(src, dst, n, at_src, at_dst)


def _sendfile(src: int, dst: int, n: int, at_src: int, at_dst: int) -> int:
    os.lseek(dst, at_dst, os.SEEK_SET)
    return os.sendfile(dst, src, at_src, n)


def _read_write(src: int, dst: int, n: int, at_src: int, at_dst: int) -> int:
    data = os.pread(src, min(n, _BUFFER), at_src)
    view = memoryview(data)
    while view:
        view = view[os.pwrite(dst, view, at_dst + len(data) - len(view)) :]
    return len(data)
