"""The seeds' way: dump to disk, tar + zstd the folder, copy the tarball to a store."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.harness import DISK, Recorder, du, raw_dump
from bench.methods.base import Method, phase
from bench.workloads import Workload
from checkpointer.criu import Criu

LABEL = "seeds: dump to disk + tar/zstd + copy"


class Seeds(Method):
    label = LABEL

    def __init__(self, rec: Recorder, criu: Criu, work: Path) -> None:
        super().__init__(rec)
        self.criu = criu
        self.store = work / "seeds-store"
        self.store.mkdir()

    def checkpoint(self, w: Workload, round_: int) -> None:
        frozen, wall, images = raw_dump(self.criu, w.pid, DISK)
        tarball = DISK / f"seed-{round_}.tar.zst"
        t0 = time.monotonic()
        subprocess.run(
            ["tar", "-I", "zstd -1 -T0", "-cf", str(tarball), "-C", str(images), "."],
            check=True,
        )
        t_tar = time.monotonic() - t0
        t0 = time.monotonic()
        shutil.copy(tarball, self.store / tarball.name)
        os.sync()
        t_copy = time.monotonic() - t0
        self.record(f"frozen_{phase(round_)}", frozen)
        self.record(f"wall_{phase(round_)}", wall + t_tar + t_copy)
        self.record(f"stored_{phase(round_)}", tarball.stat().st_size)
        shutil.rmtree(images)
        tarball.unlink()

    def stored_bytes(self) -> int:
        return du(self.store)
