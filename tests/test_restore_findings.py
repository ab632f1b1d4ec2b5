"""The restore path's audit findings (issue 28): a rebuild seeded from a kept image on another
filesystem copies, the restore retry loop outlives 1024 attempts, a lazy restore that meets a
stopped bucket is retried and never marks its checkpoint bad, and a manual restore takes the
newest good checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from checkpointer.config import RestorePolicy
from checkpointer.engine import Workload, WorkloadKind, lazy_restoring
from checkpointer.engine.lazy_restoring import LazyTransfer, RepositoryPages
from checkpointer.engine.policy import Streak, backoff, on_death, retry_later
from storage import CheckpointNotFound, CorruptCheckpoint, Repository
from storage.backends import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.errors import TransientStorageError
from storage.file_copy import copy_range
from storage.repository import CHUNK_SIZE
from tests.support import (
    COUNTER,
    PROGRAMS,
    S3_ENV,
    Daemon,
    Moto,
    free_port,
    http_get,
    kill_tree,
    s3_config,
    serve,
)
from tests.test_lazy_restore import lazy_done
from tests.test_metrics import ALERTS, scrape, value

MiB = 1024 * 1024


@pytest.fixture
def shm_folder() -> Iterator[Path]:
    """A private folder on tmpfs (/dev/shm), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="ckpt-test-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class PackBytesRead(LocalBlobStore):
    """The local backend, counting the bytes of packs read by any of its read calls."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pack_bytes = 0

    def _count(self, key: str, n: int) -> None:
        if key.endswith(".pack"):
            self.pack_bytes += n

    def get(self, key: str, limit: int | None = None) -> bytes:
        data = super().get(key, limit)
        self._count(key, len(data))
        return data

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        data = super().get_into(key, buffer, limit)
        self._count(key, len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        data, size = super().get_range(key, offset, length)
        self._count(key, len(data))
        return data, size


def test_a_rollback_rebuild_copies_from_a_seed_on_tmpfs_into_a_folder_on_disk(
    workdir: Path, shm_folder: Path
) -> None:
    """The kept newest image on tmpfs, the older checkpoint rebuilt on disk (/dev/shm short of
    room): copy_file_range says EXDEV across the two, and the pages they share must still be
    copied, not downloaded."""
    assert os.stat(shm_folder).st_dev != os.stat(workdir).st_dev, "needs two filesystems"
    store = PackBytesRead(workdir / "repo")
    repo = Repository(store, codec=Sealed(new_master()))
    src = workdir / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(16 * MiB))
    (src / "core-1.img").write_bytes(os.urandom(1000))
    older = repo.commit("w", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with open(src / "pages-1.img", "r+b") as f:  # 8 pages change: the newest checkpoint
        for i in range(8):
            f.seek((100 + 7 * i) * CHUNK_SIZE)
            f.write(os.urandom(CHUNK_SIZE))
    newer = repo.commit("w", src)
    kept = shm_folder / "kept"  # the kept image of the newest checkpoint, on tmpfs
    shutil.copytree(src, kept)
    out = workdir / "rollback"  # on disk
    store.pack_bytes = 0
    repo.materialize("w", older.id, out, seed=(newer.id, kept))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # The 8 pages the seed lacks come from the one pack that holds them (read whole, ~4 MiB),
    # not the 16 MiB of all four.
    assert 0 < store.pack_bytes < 5 * MiB, store.pack_bytes


def test_copy_range_crosses_filesystems_at_any_offsets(workdir: Path, shm_folder: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    (shm_folder / "a").write_bytes(data)
    src = os.open(shm_folder / "a", os.O_RDONLY)
    dst = os.open(workdir / "b", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(dst, 4 * MiB)
        assert copy_range(src, dst, MiB + 5, 2 * MiB, 7) == MiB + 5
        assert os.pread(dst, MiB + 5, 7) == data[2 * MiB : 3 * MiB + 5]
        with pytest.raises(OSError, match="ended"):
            copy_range(src, dst, MiB, 3 * MiB, 0)  # past the source's end
    finally:
        os.close(src)
        os.close(dst)


# What a restore prints in the CRIU wrapper below: a failure outside the checkpoint (retried,
# never marked bad), or the checkpoint's own (marked bad).
PID_TAKEN = "Error (criu/cr-restore.c:1): Can't fork for 4242: File exists"
FILE_CHANGED = "Error (criu/files-reg.c:2294): File tmp/x has bad size 986 (expect 932)"


def failing_criu(workdir: Path, error: str = PID_TAKEN, once: bool = False) -> tuple[Path, Path]:
    """A CRIU wrapper for the daemon (criu.binary): while the flag file exists, every
    `criu restore` fails with `error` (the first only, if `once`); everything else runs the
    real CRIU."""
    real = shutil.which("criu")
    assert real is not None
    flag = workdir / "restores-fail"
    wrapper = workdir / "criu-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = restore ] && [ -e {flag} ]; then\n'
        + (f"  rm {flag}\n" if once else "")
        + f'  echo "{error}" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o700)
    return wrapper, flag


def test_the_restore_retry_loop_outlives_1100_failed_attempts(workdir: Path) -> None:
    """`backoff_initial * 2**n` overflowed a float past 1024 retries: the supervisor's timer
    thread died and the workload stayed `restoring` for good. Each retry now waits the capped
    back-off (1 ms here), the count shows in `status`, and the first restore that works ends
    the loop with the checkpoint's state."""
    wrapper, flag = failing_criu(workdir)
    port = free_port()
    d = Daemon(
        workdir,
        f"""
criu:
  binary: {wrapper}
workloads:
  - name: web
    command: [{sys.executable}, {COUNTER}, "{port}"]
    restore: {{backoff_initial: 1ms, backoff_max: 1ms}}
""",
    )
    try:
        d.start()
        assert serve(port, 3) == "3"
        cid = d.checkpoint("web")
        flag.touch()
        kill_tree(d.pid("web"))
        st = d.wait_for("web", lambda s: s["restore_retries"] >= 1100, timeout=240)
        assert st["state"] == "restoring" and st["bad_checkpoints"] == [], st
        assert st["restores"][-1]["result"] == "retry", st["restores"]
        assert "restore retried" in d.cli("status").stdout
        flag.unlink()
        st = d.wait_for("web", lambda s: s["state"] == "running", timeout=30)
        assert st["restores"][-1]["checkpoint"] == cid and st["restore_retries"] == 0
        assert http_get(port) == "4"  # the checkpoint's count, + 1
        # Counted as retries, not failures: the restore-failed alert stays quiet.
        m = scrape(d)
        assert value(m, "checkpointer_restores_total", reason="crash", result="retry") >= 1100
        assert value(m, "checkpointer_restores_total", reason="crash", result="failure") == 0
    finally:
        d.stop()


def test_one_back_off_capped_for_loops_and_retries_past_1024_attempts() -> None:
    """A crash loop with max_attempts above 1024 overflowed the same way as the retries."""
    p = RestorePolicy(backoff_initial=0.5, backoff_max=300, max_attempts=5000)
    assert [backoff(p, n) for n in (0, 1, 2, 9, 1023, 1024, 10**9)] == [
        0.5, 1.0, 2.0, 256.0, 300, 300, 300
    ]  # fmt: skip
    d = on_death(p, Streak(1100, 1100, last_restore_at=1000.0), 1001.0, False, "c9")
    assert d.action == "restore" and d.delay == 300 and d.streak.crash_looped == ("c9",)
    streak = Streak(retries=5000)
    streak, delay = retry_later(p, streak)
    assert streak.retries == 5001 and delay == 300


class FailedTransfer:
    """What `settle` sees of a LazyRestore that failed."""

    stall_timeout = 0.4
    reason = "no page transferred for 0s (stall watchdog)"
    host_fault: str | None = None  # the guard did not die: not this host's own failure

    def failed(self) -> bool:
        return True


class Files:
    """A checkpoint's files whose reads take `delay` seconds, then return or raise `error`."""

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay, self.error = delay, error

    def read(self, name: str, offset: int, length: int) -> bytes:
        time.sleep(self.delay)
        if self.error:
            raise self.error
        return bytes(length)


def settled(files: Files, read_in_background: bool = False) -> Workload:
    """A workload whose lazy restore of `c1` failed after one page read from `files`."""
    pages = RepositoryPages(files)  # type: ignore[arg-type]
    if read_in_background:
        threading.Thread(target=pages.read, args=(1, 0, 1), daemon=True).start()
        time.sleep(0.3)  # the stall watchdog fires while the read still waits
    else:
        with contextlib.suppress(Exception):
            pages.read(1, 0, 1)
    w = Workload(name="w", kind=WorkloadKind.MANAGED)
    w.lazy = LazyTransfer("c1", FailedTransfer(), pages=pages)
    assert lazy_restoring.settle(w)
    return w


def test_a_lazy_restore_that_failed_on_storage_leaves_its_checkpoint_good() -> None:
    for w in (
        settled(Files(error=TransientStorageError("bucket down"))),
        settled(Files(delay=5), read_in_background=True),  # storage still retrying: a stall
    ):
        assert w.bad_checkpoints == [] and not w.lazy_off
        assert w.history[-1].result == "retry" and "storage" in w.history[-1].detail
    for w in (
        settled(Files(error=CorruptCheckpoint("pack tag mismatch"))),
        settled(Files()),  # reads were quick: CRIU stopped asking, not the storage's fault
    ):
        assert w.bad_checkpoints == ["c1"] and w.lazy_off
        assert w.history[-1].result == "failed"


def test_a_lazy_restore_from_a_stopped_bucket_is_retried_and_never_marked_bad(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    """The bucket stops (SIGSTOP of moto_server) while pages are on their way: the tree is
    killed (it never runs on missing pages), its checkpoint stays good, restores are retried
    while the bucket is down, and once it answers again the same checkpoint comes back."""
    port = free_port()
    d = Daemon(
        workdir,
        s3_config(moto, bucket)
        + f"""
workloads:
  - name: web
    command: [{sys.executable}, {PROGRAMS / "ballast_server.py"}, "{port}", "96"]
    restore: {{lazy: true, backoff_initial: 500ms, backoff_max: 2s}}
""",
    )
    d.env.update(S3_ENV)
    try:
        d.start()
        assert serve(port, 3) == "3"
        cid = d.checkpoint("web")
        deadline = time.monotonic() + 60
        while not any(k.endswith(f"/{cid}.json") for k in moto.keys(bucket, "ckpt/")):
            assert time.monotonic() < deadline, "the checkpoint never reached the bucket"
            time.sleep(0.2)
        # As on another host: nothing of the checkpoint is local, every page comes from S3.
        d.terminate()  # the tree runs on, and is adopted again
        shutil.rmtree(d.state / "cache")
        d.drop_kept_images()
        d.start()
        log_start = len(d.log.read_text())
        kill_tree(d.pid("web"))
        deadline = time.monotonic() + 60
        while "the tree runs as pid" not in d.log.read_text()[log_start:]:
            assert time.monotonic() < deadline, d.log.read_text()[-3000:]
            time.sleep(0.02)
        moto.pause()  # mid-transfer: 96 MB take seconds from moto_server
        try:
            assert "all pages arrived" not in d.log.read_text()[log_start:], "too late"
            st = d.wait_for(
                "web",
                lambda s: (
                    any(r["reason"] == "lazy" for r in s["restores"])
                    and s["restores"][-1]["result"] == "retry"
                    and s["restores"][-1]["reason"] == "crash"
                ),
                timeout=60,
            )
            lazy = [r for r in st["restores"] if r["reason"] == "lazy"]
            assert lazy[-1]["result"] == "retry" and "storage unavailable" in lazy[-1]["detail"]
            assert st["bad_checkpoints"] == [] and st["state"] == "restoring", st
        finally:
            moto.resume()
        st = d.wait_for("web", lambda s: s["state"] == "running", timeout=90)
        assert st["bad_checkpoints"] == [], st
        assert st["restores"][-1]["checkpoint"] == cid and st["restores"][-1]["result"] == "ok"
        lazy_done(d)
        assert http_get(port) == "4"  # the checkpoint's count, + 1: the state is its own
    finally:
        d.stop()


def test_restore_retries_never_fire_the_restore_failed_alert(workdir: Path) -> None:
    """The shipped rules, evaluated by promtool: a workload whose restore is retried every
    minute (storage down) does not page as failed, and is warned about after 30 minutes; a
    restore that failed does page."""
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in rules["groups"][0]["rules"]:
        del rule["annotations"]  # promtool would compare every word of them
    (workdir / "alerts.yaml").write_text(yaml.safe_dump(rules))
    series = "checkpointer_restores_total{{instance='h',workload='{}',reason='{}',result='{}'}}"
    tests = workdir / "alerts-test.yaml"
    tests.write_text(
        f"""
rule_files: [{workdir / "alerts.yaml"}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: "{series.format("web", "crash", "retry")}"
        values: '0+1x60'
      - series: "{series.format("web", "crash", "failure")}"
        values: '0x60'
      - series: "{series.format("db", "manual", "failure")}"
        values: '0 0 1x58'
    alert_rule_test:
      - eval_time: 5m
        alertname: CheckpointerRestoreFailed
        exp_alerts:
          - exp_labels: {{severity: page, instance: h, workload: db, reason: manual}}
      - eval_time: 20m
        alertname: CheckpointerRestoreRetrying
        exp_alerts: []
      - eval_time: 45m
        alertname: CheckpointerRestoreRetrying
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h, workload: web}}
"""
    )
    r = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_restore_without_a_checkpoint_takes_the_newest_good_one_and_list_says_why(
    workdir: Path,
) -> None:
    """A rollback to the newest checkpoint fails for a fault of its own (marked bad): `list`
    shows the mark and why, `restore NAME` takes the one before, and only `--checkpoint`
    restores the bad one, with a warning."""
    wrapper, flag = failing_criu(workdir, FILE_CHANGED, once=True)
    d = Daemon(workdir, f"criu:\n  binary: {wrapper}\n")
    port = free_port()
    try:
        d.start()
        d.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        assert serve(port, 3) == "3"
        older = d.checkpoint("web")
        assert serve(port, 2) == "5"
        newest = d.checkpoint("web")
        flag.touch()
        r = d.cli("rollback", "web", "--to", newest, check=False)
        assert r.returncode != 0 and "bad size" in r.stderr, r.stderr
        listed = {c["id"]: c for c in d.json("list", "web")}
        assert listed[newest]["mark"] == "bad" and "bad size" in listed[newest]["mark_reason"]
        assert listed[older]["mark"] is None and listed[older]["mark_reason"] is None
        assert "bad: " in d.cli("list", "web").stdout
        r = d.cli("restore", "web")
        assert f"from {older}" in r.stdout and "warning" not in r.stderr, r
        assert http_get(port) == "4"  # the older checkpoint's count, + 1
        kill_tree(d.pid("web"))
        r = d.cli("restore", "web", "--checkpoint", newest)
        assert f"warning: checkpoint {newest} of web is marked bad" in r.stderr, r.stderr
        assert http_get(port) == "6"
    finally:
        d.stop()


def test_a_crash_looped_checkpoint_is_skipped_unless_named() -> None:
    from checkpointer.engine.marks import marks, newest_unmarked

    w = Workload(name="w", kind=WorkloadKind.MANAGED)
    w.streak = Streak(2, 2, 1.0, crash_looped=("c3", "c2"))
    w.bad_checkpoints = ["c4"]
    assert newest_unmarked(w, ["c4", "c3", "c2", "c1"]) == "c1"
    assert marks(w)["c3"][0] == "crash-looped" and marks(w)["c4"][0] == "bad"
    w.streak = Streak(crash_looped=["c1"])  # type: ignore[arg-type]  # as the registry reads it
    assert w.streak.crash_looped == ("c1",)
    with pytest.raises(CheckpointNotFound, match="--checkpoint ID"):
        newest_unmarked(w, ["c4", "c1"])
