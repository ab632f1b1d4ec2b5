"""checkpointer's own pipeline, the code path the daemon runs (bench/worker.py, one process per
checkpoint or restore): to a local folder, keeping the newest image in tmpfs; or to S3 (spool,
then uploaded: durable).

The repository is encrypted, as it is by default (AES-256-GCM objects, keyed chunk ids): the
labels without a suffix, as in results from before encryption existed, now mean encrypted.
The local pipeline is also measured in clear (`storage.encryption: false`, " (clear)"), side
by side in the same rounds, for the encrypted / clear ratios of the report.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import DISK, SHM, Recorder, du, kill, worker
from bench.methods.base import Method, phase
from bench.workloads import Workload
from tests.support.moto_server import Moto

LOCAL = "checkpointer local"
S3 = "checkpointer s3"
KEPT = "checkpointer local (kept image)"
OLDER = "checkpointer local (previous checkpoint, newest kept)"
CLEAR = "checkpointer local (clear)"
CLEAR_KEPT = "checkpointer local (clear, kept image)"
CLEAR_OLDER = "checkpointer local (clear, previous checkpoint, newest kept)"


class Checkpointer(Method):
    encrypted = True

    def __init__(self, rec: Recorder, key_file: Path) -> None:
        super().__init__(rec)
        self.last_id = ""
        self.prev_id = ""
        self.key_file = key_file  # inside the run's scratch folder, never /etc

    def store(self) -> dict[str, Any]:
        """The worker's arguments naming the store a checkpoint goes to."""
        raise NotImplementedError

    def crypto(self) -> dict[str, Any]:
        """The worker's arguments saying how the repository is opened."""
        return {"encryption": self.encrypted, "key_file": str(self.key_file)}

    def run_checkpoint(self, w: Workload, store: dict[str, Any]) -> dict[str, Any]:
        o = worker(
            {
                **store,
                **self.crypto(),
                "op": "checkpoint",
                "pid": w.pid,
                "workload": "w",
                "scratch": str(SHM / "worker"),
            }
        )
        assert o["encrypted"] == self.encrypted, o
        return o

    def record_checkpoint(self, o: dict[str, Any], p: str) -> None:
        self.record(f"frozen_{p}", o["frozen"])
        self.record(f"wall_{p}", o["durable"])
        self.record(f"stored_{p}", o["new_bytes"])
        self.record(f"commit_{p}", o["commit"])
        self.record(f"throughput_{p}", o["image"] / o["commit"])
        self.record("image_bytes", o["image"])
        self.record("peak_rss_mb", o["peak_rss_mb"])
        self.record("cpu_seconds", o["cpu_seconds"])

    def checkpoint(self, w: Workload, round_: int) -> None:
        o = self.run_checkpoint(w, self.store())
        self.prev_id, self.last_id = self.last_id, o["id"]
        self.record_checkpoint(o, phase(round_))

    def restores(
        self, pid: int, label: str, checkpoint_id: str, args: dict[str, Any], times: int = 3
    ) -> int:
        """`times` restores of `checkpoint_id`, each killing the tree the one before brought
        back."""
        for _ in range(times):
            if args["backend"] == "s3":
                args["cache"] = str(Path(tempfile.mkdtemp(dir=DISK)))  # empty every time
            kill(pid)
            o = worker(
                {
                    **args,
                    **self.crypto(),
                    "op": "restore",
                    "workload": "w",
                    "id": checkpoint_id,
                    "scratch": str(SHM / "worker"),
                }
            )
            pid = o["pid"]
            assert o["kept_image"] == (checkpoint_id == args.get("hot_id")), o
            assert o["encrypted"] == self.encrypted, o
            self.rec(label, "restore", o["wall"])
            self.rec(label, "restore_fetch", o["fetch"])
            self.rec(label, "restore_peak_rss_mb", o["peak_rss_mb"])
        return pid


class CheckpointerLocal(Checkpointer):
    """Restores three ways: the newest from the image kept in tmpfs; the previous one, rebuilt
    with what it shares with the kept image; the newest rebuilt from the repository alone.

    `encrypted=False`: the same in clear, under the " (clear)" labels, with its own
    repository and kept image."""

    def __init__(self, rec: Recorder, work: Path, encrypted: bool = True) -> None:
        name = "repo-local" if encrypted else "repo-local-clear"
        super().__init__(rec, work / f"{name}.key")
        self.encrypted = encrypted
        self.label = LOCAL if encrypted else CLEAR
        self.kept_label, self.older_label = (
            (KEPT, OLDER) if encrypted else (CLEAR_KEPT, CLEAR_OLDER)
        )
        self.work, self.repo = work, work / name
        self.hot = SHM / ("hot" if encrypted else "hot-clear")
        self.firsts = 0

    def store(self) -> dict[str, Any]:
        return {"backend": "local", "repo": str(self.repo), "keep": str(self.hot)}

    def another_first(self, w: Workload) -> None:
        """One more first checkpoint (a full one, into a new repository with a new key, then
        deleted): a first checkpoint is one sample per workload otherwise, and the encrypted
        / clear ratio of first checkpoints is judged on their medians."""
        self.firsts += 1
        repo = self.work / f"{self.repo.name}-first-{self.firsts}"
        key_file = self.key_file
        self.key_file = repo.with_suffix(".key")
        try:
            o = self.run_checkpoint(w, {"backend": "local", "repo": str(repo)})
            self.record_checkpoint(o, "first")
        finally:
            self.key_file = key_file
            shutil.rmtree(repo, ignore_errors=True)
            repo.with_suffix(".key").unlink(missing_ok=True)

    def stored_bytes(self) -> int:
        return du(self.repo)

    def restore_kind(self, pid: int, kind: str, times: int = 3) -> int:
        """`kind`: "kept" (the newest, from the kept image), "older" (the previous one, rebuilt
        with the kept image's chunks) or "rebuilt" (the newest, from the repository alone)."""
        newest = self.last_id
        kept = {"backend": "local", "repo": str(self.repo), "hot": str(self.hot), "hot_id": newest}
        if kind == "kept":
            return self.restores(pid, self.kept_label, newest, kept, times)
        if kind == "older":
            return self.restores(pid, self.older_label, self.prev_id, kept, times)
        alone = {"backend": "local", "repo": str(self.repo)}
        return self.restores(pid, self.label, newest, alone, times)

    def restore(self, pid: int) -> int:
        for kind in RESTORE_KINDS:
            pid = self.restore_kind(pid, kind)
        return pid


RESTORE_KINDS = ("kept", "older", "rebuilt")


def restore_side_by_side(pair: list[CheckpointerLocal], pid: int, times: int = 4) -> int:
    """The restores of two variants (encrypted, clear) interleaved one by one, the one going
    first alternating, `times` each per kind: their ratio is then measured under the same
    load, not in two blocks a minute apart on a shared machine."""
    for kind in RESTORE_KINDS:
        for i in range(times):
            for m in pair if i % 2 == 0 else pair[::-1]:
                pid = m.restore_kind(pid, kind, 1)
    return pid


class CheckpointerS3(Checkpointer):
    """Restores from the bucket with an empty cache. Encrypted only: moto is too slow for an
    encrypted / clear ratio to mean anything."""

    label = S3

    def __init__(self, rec: Recorder, work: Path, moto: Moto, bucket: str) -> None:
        super().__init__(rec, work / "s3.key")
        self.moto, self.bucket, self.cache = moto, bucket, work / "cache-a"

    def store(self) -> dict[str, Any]:
        return {
            "backend": "s3",
            "bucket": self.bucket,
            "url": self.moto.url,
            "cache": str(self.cache),
        }

    def restore(self, pid: int) -> int:
        args = {"backend": "s3", "bucket": self.bucket, "url": self.moto.url, "cache": None}
        return self.restores(pid, S3, self.last_id, args)
