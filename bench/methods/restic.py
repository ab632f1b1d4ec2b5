"""restic backing up the image folder (dumped to tmpfs), to a local folder or to S3. restic
encrypts too (AES-256-CTR + Poly1305): the comparison for the encrypted repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.harness import SHM, Recorder, du, kill, raw_dump, timed
from bench.methods.base import Method, phase
from bench.workloads import Workload
from checkpointer.criu import Criu, DumpOptions
from tests.support.moto_server import Moto

ENV = {
    "RESTIC_PASSWORD": "bench",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
}


def restic(repo: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        ["restic", "--repo", repo, "--json", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        check=True,
    )
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    return lines[-1] if lines else {}


class Restic(Method):
    """Records what the repository grew by at each backup, and its throughput (image bytes
    over the backup's wall time, as checkpointer's is over its commit)."""

    def __init__(self, rec: Recorder, criu: Criu) -> None:
        super().__init__(rec)
        self.criu = criu
        self.repo = ""
        self.last_images: Path | None = None  # the folder the newest backup was made of

    def size(self) -> int:
        raise NotImplementedError

    def checkpoint(self, w: Workload, round_: int) -> None:
        frozen, wall, images = raw_dump(self.criu, w.pid, SHM)
        before = self.size()
        t, _ = timed(lambda: restic(self.repo, "backup", str(images)))
        self.record(f"frozen_{phase(round_)}", frozen)
        self.record(f"wall_{phase(round_)}", wall + t)
        self.record(f"stored_{phase(round_)}", self.size() - before)
        self.record(f"throughput_{phase(round_)}", du(images) / t)
        shutil.rmtree(images)
        self.last_images = images


class ResticLocal(Restic):
    label = "restic local"

    def __init__(self, rec: Recorder, criu: Criu, work: Path) -> None:
        super().__init__(rec, criu)
        self.path = work / "restic-local"
        self.repo = str(self.path)
        restic(self.repo, "init")

    def size(self) -> int:
        return du(self.path)

    def stored_bytes(self) -> int:
        return du(self.path)

    def restore(self, pid: int) -> int:
        """Three restores of the newest backup, as checkpointer's "rebuilt from the
        repository": restic restores the image folder into tmpfs, then CRIU restores it."""
        assert self.last_images is not None
        for _ in range(3):
            kill(pid)
            target = SHM / f"restic-restore-{time.time_ns()}"
            t0 = time.monotonic()
            restic(self.repo, "restore", "latest", "--target", str(target))
            t_fetch = time.monotonic() - t0
            images = target / self.last_images.relative_to("/")
            pid, _stats = self.criu.restore(images, DumpOptions(), "bench")
            self.record("restore", time.monotonic() - t0)
            self.record("restore_fetch", t_fetch)
            shutil.rmtree(target)
        return pid


class ResticS3(Restic):
    label = "restic s3"

    def __init__(self, rec: Recorder, criu: Criu, moto: Moto, bucket: str) -> None:
        super().__init__(rec, criu)
        self.moto, self.s3 = moto, moto.client()
        self.bucket = moto.create_bucket(bucket)
        self.repo = f"s3:{moto.url}/{bucket}"
        restic(self.repo, "init")

    def size(self) -> int:
        return self.moto.stored_bytes(self.bucket, self.s3)
