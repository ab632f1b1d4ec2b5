"""The yardstick for the pipeline's throughput: a tight single-threaded BLAKE3 + zstd (level 1)
pass over the 4 KiB chunks of the raw CRIU images, on the first two rounds."""

from __future__ import annotations

import time
from pathlib import Path

from bench.harness import Recorder
from bench.methods.base import Method
from bench.methods.raw_criu import RawCriu
from bench.workloads import Workload

LABEL = "raw blake3+zstd pass"


class Yardstick(Method):
    label = LABEL

    def __init__(self, rec: Recorder, raw: RawCriu) -> None:
        super().__init__(rec)
        self.raw = raw  # runs after it in each round, over the images it just dumped

    def checkpoint(self, w: Workload, round_: int) -> None:
        if round_ < 2 and self.raw.images is not None:
            self.record("bytes_per_second", raw_pass(self.raw.images))


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
