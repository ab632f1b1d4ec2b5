"""The yardsticks for the pipeline's throughput, on the first two rounds, over the raw CRIU
images: a tight single-threaded BLAKE3 + zstd (level 1) pass over their 4 KiB chunks, and a
plain write of the same bytes to the repository's disk (4 MiB files, each fsynced, as packs
are). Incompressible pages are stored raw, so for them the disk, not zstd, may be the bound:
the table shows both and the target is judged against the lower."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.harness import Recorder
from bench.methods.base import Method
from bench.methods.raw_criu import RawCriu
from bench.workloads import Workload

LABEL = "raw blake3+zstd pass"


class Yardstick(Method):
    label = LABEL

    def __init__(self, rec: Recorder, raw: RawCriu, disk: Path) -> None:
        super().__init__(rec)
        self.raw = raw  # runs after it in each round, over the images it just dumped
        self.disk = disk  # where the repositories are

    def checkpoint(self, w: Workload, round_: int) -> None:
        if round_ < 2 and self.raw.images is not None:
            self.record("bytes_per_second", raw_pass(self.raw.images))
            self.record("disk_bytes_per_second", disk_pass(self.raw.images, self.disk))


def raw_pass(folder: Path) -> float:
    """Bytes/s of a tight single-threaded BLAKE3 + zstd (level 1) pass over the 4 KiB chunks
    of an image: what the pipeline's throughput is measured against."""
    import blake3
    import zstandard

    c = zstandard.ZstdCompressor(level=1)
    total = 0
    t0 = time.monotonic()
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                for off in range(0, len(block), 4096):
                    chunk = block[off : off + 4096]
                    blake3.blake3(chunk).digest()
                    c.compress(chunk)
                total += len(block)
    return total / (time.monotonic() - t0)


def disk_pass(folder: Path, disk: Path) -> float:
    """Bytes/s of writing the image's bytes to `disk` as 4 MiB files, each fsynced."""
    out = Path(tempfile.mkdtemp(prefix="disk-pass-", dir=disk))
    total, n = 0, 0
    try:
        t0 = time.monotonic()
        for path in sorted(folder.iterdir()):
            with open(path, "rb") as f:
                while block := f.read(4 << 20):
                    fd = os.open(out / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.write(fd, block)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    total, n = total + len(block), n + 1
        return total / (time.monotonic() - t0)
    finally:
        shutil.rmtree(out, ignore_errors=True)
