"""CRIU alone, dumping into tmpfs: the floor for the pause, and for the restore."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.harness import SHM, Recorder, du, kill, raw_dump, timed
from bench.methods.base import Method, phase
from bench.workloads import Workload
from checkpointer.criu import Criu, DumpOptions
from checkpointer.criu.images.memory import changed_page_bytes

LABEL = "raw criu (tmpfs)"


class RawCriu(Method):
    """Also records the `floor`: the bytes of pages changed between consecutive images."""

    label = LABEL

    def __init__(self, rec: Recorder, criu: Criu) -> None:
        super().__init__(rec)
        self.criu = criu
        self.images: Path | None = None  # this round's images (the yardstick reads them)

    def checkpoint(self, w: Workload, round_: int) -> None:
        frozen, wall, images = raw_dump(self.criu, w.pid, SHM)
        self.record(f"frozen_{phase(round_)}", frozen)
        self.record(f"wall_{phase(round_)}", wall)
        self.record("image_bytes", du(images))
        if self.images is not None:
            self.rec("floor", "changed_page_bytes", changed_page_bytes(self.images, images))
            shutil.rmtree(self.images)
        self.images = images

    def rounds_done(self) -> None:
        if self.images is not None:
            shutil.rmtree(self.images)
            self.images = None

    def restore(self, pid: int) -> int:
        """Three restores of one fresh dump."""
        _, _, images = raw_dump(self.criu, pid, SHM)
        for _ in range(3):
            kill(pid)
            t, (pid, _stats) = timed(lambda: self.criu.restore(images, DumpOptions(), "bench"))
            self.record("restore", t)
        shutil.rmtree(images)
        return pid
