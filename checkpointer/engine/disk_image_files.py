"""Byte ranges of a disk image's files, each chunk checked against the checkpoint's manifest:
what a lazy restore after a reboot reads its pages from.

After a reboot a disk image is checked before a full restore trusts it: every file hashed
again (checkpointer/engine/disk_images.py), which reads the whole image from a cold disk
before CRIU reads it a second time, nearly twice raw CRIU's restore for 1 GB. A lazy restore
needs neither pass up front: the tree starts once its small images are written, and each page
it asks for is read from the disk image and checked on its own, by its chunk id (the
repository's keyed hash) against the digest the manifest lists for it. The manifest comes from
the repository, authenticated, so the check is as strong as a restore from the repository: a
page the disk changed, or a crash left half-written, is an error, never bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

from storage import Repository
from storage.manifest import DIGEST_SIZE, FileEntry, Manifest


class DiskImageDamaged(OSError):
    """A chunk of a disk image that does not match the manifest, or a file of it that cannot
    be read: the disk image is unusable (the checkpoint itself is not at fault)."""


class DiskImageFiles:
    """Reads ranges of the files of one checkpoint from its disk image. Safe from several
    threads (positional reads, one descriptor per file opened once)."""

    def __init__(self, repo: Repository, workload: str, checkpoint_id: str, folder: Path) -> None:
        self.manifest: Manifest = repo.read_manifest(workload, checkpoint_id)
        self.files: Mapping[str, FileEntry] = {f.name: f for f in self.manifest.files}
        self.folder = folder
        self._chunk_ids = repo.codec.chunk_ids
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def locate_ahead(self, names: list[str]) -> None:
        """Nothing to locate: every chunk is where the file says (the repository's reader
        finds its chunks in packs meanwhile)."""

    def read(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes of file `name` from `offset` (clipped at its end), each chunk they
        touch checked; DiskImageDamaged if one does not match or cannot be read."""
        f = self.files.get(name)
        if f is None:
            raise DiskImageDamaged(f"the manifest has no file {name!r}")
        chunk = self.manifest.chunk_size
        end = min(offset + length, f.size)
        if offset < 0 or offset > end:
            raise ValueError(f"{name}: no bytes at {offset}")
        first, stop = offset // chunk, -(-end // chunk)
        start, size = first * chunk, min(stop * chunk, f.size) - first * chunk
        try:
            data = os.pread(self._fd(name), size, start)
        except OSError as e:
            raise DiskImageDamaged(f"{self.folder / name}: {e.strerror or e}") from e
        if len(data) != size:
            raise DiskImageDamaged(f"{self.folder / name} is shorter than its checkpoint's file")
        ids = self._chunk_ids(memoryview(data), chunk)  # a file's short last chunk too
        expected = f.digests[first * DIGEST_SIZE : stop * DIGEST_SIZE]
        if ids != expected:
            bad = next(
                k
                for k in range(stop - first)
                if ids[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
                != expected[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
            )
            raise DiskImageDamaged(
                f"{self.folder / name}: chunk {first + bad} does not match the checkpoint's "
                "manifest (damaged on disk, or cut by a crash)"
            )
        with self._lock:
            self.bytes_read += size
        skip = offset - start
        return data[skip : skip + end - offset]

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                # O_NONBLOCK: a FIFO planted in the slot would block the open until a writer
                # came (no effect on the regular file it must be).
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                fd = os.open(self.folder / name, flags)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise DiskImageDamaged(f"{self.folder / name} is not a regular file")
                self._fds[name] = fd
                if name.startswith("pages-"):
                    _read_ahead(fd)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _read_ahead(fd: int) -> None:
    """Tell the kernel the pages file is read in order (the background transfer walks it so):
    its read-ahead window doubles, a cold disk's reads run ahead of the requests. Not
    WILLNEED on the whole file: that queues a GB of reads in front of the pages the tree
    faults on, for no gain measured (bench.restore_speed: last page 4.11 s without any advice,
    4.07 s with WILLNEED, cold read of the files 3.5 and 3.35 s). Advice only."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
