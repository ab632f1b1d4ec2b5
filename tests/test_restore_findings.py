"""The restore path's audit findings (issue 28): a rebuild seeded from a kept image on another
filesystem copies, the restore retry loop outlives 1024 attempts, a lazy restore that meets a
stopped bucket is retried and never marks its checkpoint bad, and a manual restore takes the
newest good checkpoint."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from checkpointer.config import RestorePolicy
from checkpointer.restore_policy import Streak, backoff, on_death, retry_later
from storage import Repository
from storage.backends import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.file_copy import copy_range
from storage.repository import CHUNK_SIZE
from tests.support import COUNTER, Daemon, free_port, http_get, kill_tree, serve
from tests.test_metrics import scrape, value

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


def failing_criu(workdir: Path) -> tuple[Path, Path]:
    """A CRIU wrapper for the daemon (criu.binary): while the flag file exists, every
    `criu restore` fails as when a PID the image needs is taken (a failure outside the
    checkpoint: retried, never marked bad); everything else runs the real CRIU."""
    real = shutil.which("criu")
    assert real is not None
    flag = workdir / "restores-fail"
    wrapper = workdir / "criu-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = restore ] && [ -e {flag} ]; then\n'
        '  echo "Error (criu/cr-restore.c:1): Can\'t fork for 4242: File exists" >&2\n'
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
