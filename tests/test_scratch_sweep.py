"""What a daemon killed mid-operation left in its scratch folders is removed when the next
one starts: everything but the kept images, folders a running process still works in (an
orphaned `criu restore`, a lazy restore's guard), and what is not ours.

Through the real daemon, killed -9 during a lazy restore: test_a_daemon_killed_mid_restore...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from checkpointer.criu.lazy.guard import GUARD_NAME
from checkpointer.criu.lazy.tree_cgroup import PREFIX, mount_point
from checkpointer.engine.scratch import Scratch, tmpfs_scratch_root
from checkpointer.engine.scratch_sweep import sweep
from tests.support import CLI, Daemon, free_port, http_get
from tests.support.lazy import checksum_server_checkpointed, pausing_criu


def _folder(root: Path, name: str) -> Path:
    (root / name / "images").mkdir(parents=True, mode=0o700)
    (root / name / "images" / "pages-1.img").write_bytes(b"\0" * 4096)
    return root / name


def test_the_sweep_keeps_kept_images_folders_in_use_and_what_is_not_ours(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    scratch = Scratch(state, None, shm=tmp_path / "shm")
    root = scratch.fallback_root()
    left = [_folder(root, "db-restore-0123abcd"), _folder(root, "db-lazy-89abcdef")]
    used = _folder(root, "web-lazy-fedcba98")
    kept = _folder(root / "hot", "db")
    drill = _folder(root, "db-drill-01234567")  # the drills' own sweep removes it
    foreign = _folder(root, "notes")
    # Stands for a guard or an orphaned `criu restore` still at work: a shell named criu.
    fake = tmp_path / "criu"
    fake.symlink_to("/bin/sh")
    user = subprocess.Popen(
        [str(fake), "-c", "sleep 60; :", str(used / "images")],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{user.pid}/comm").read_text().strip() != "criu":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert sorted(sweep(scratch)) == sorted(left)
        assert all(f.is_dir() for f in (used, kept, drill, foreign))
        assert not any(f.exists() for f in left)
    finally:
        os.killpg(user.pid, signal.SIGKILL)  # the group it leads: it and its sleep
        user.wait()
    assert sweep(scratch) == [used]  # the next start: nothing works in it any more


def test_the_sweep_removes_empty_cgroups_of_lazy_restores_whose_guard_is_gone(
    tmp_path: Path,
) -> None:
    mount = mount_point()
    assert mount is not None, "no cgroup v2 hierarchy here: lazy restores of adopted trees need one"
    fake = tmp_path / GUARD_NAME  # a live guard, as the sweep knows one: by its name
    fake.symlink_to("/bin/sh")
    guard = subprocess.Popen(
        [str(fake), "-c", "sleep 60; :"], stdin=subprocess.DEVNULL, start_new_session=True
    )
    stale, held = mount / f"{PREFIX}999999999", mount / f"{PREFIX}{guard.pid}"
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{guard.pid}/comm").read_text().strip() != GUARD_NAME:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stale.mkdir()
        held.mkdir()
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        sweep(Scratch(state, None, shm=tmp_path / "shm"))
        assert not stale.exists(), "the cgroup of a guard that is gone was left"
        assert held.exists(), "the cgroup of a live guard was removed"
    finally:
        os.killpg(guard.pid, signal.SIGKILL)
        guard.wait()
        for cgroup in (stale, held):
            with contextlib.suppress(FileNotFoundError):
                cgroup.rmdir()


def scratch_folders(d: Daemon) -> list[Path]:
    """The operation folders in the daemon's scratch roots (kept images aside)."""
    roots = [d.state / "scratch", tmpfs_scratch_root(d.state)]
    return sorted(f for r in roots if r.is_dir() for f in r.iterdir() if f.name != "hot")


def test_a_daemon_killed_mid_restore_leaves_nothing_to_its_successor(workdir: Path) -> None:
    """kill -9 of the daemon while a lazy `criu restore` runs: the next daemon keeps the
    folder while the orphaned restore still works in it, removes it at the start after, and
    restores the workload."""
    release = workdir / "release"
    wrapper, mark = pausing_criu(workdir, "before-resume", until=release)
    d = Daemon(workdir, f"criu:\n  binary: {wrapper}\n")
    d.start()
    restore: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        right = checksum_server_checkpointed(d, port, 20)  # restored from the repository
        restore = subprocess.Popen(
            [*CLI, "restore", "sums", "--config", str(d.config)],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert time.monotonic() < deadline, d.log.read_text()[-3000:]
            time.sleep(0.01)
        left = scratch_folders(d)
        assert [f.name.startswith("sums-lazy-") for f in left] == [True], left
        assert d.proc is not None
        d.proc.kill()  # kill -9, mid-restore: `criu restore` waits in its hook, orphaned
        d.proc.wait()
        d.start()
        assert scratch_folders(d) == left, "removed under a restore still at work"
        release.touch()  # the orphan goes on: its hook finds no guard, CRIU aborts
        restore.wait(60)
        _wait_no_criu_in(left[0], 30)
        d.stop()
        d.start()
        assert scratch_folders(d) == [], "the killed daemon's restore folder is still there"
        d.cli("restore", "sums", "--full")
        assert http_get(port, timeout=60) == right
        assert scratch_folders(d) == []
    finally:
        release.touch()
        if restore is not None:
            restore.wait(60)
        d.stop()


def _wait_no_criu_in(folder: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        users = []
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                if (
                    entry.isdigit()
                    and str(folder).encode() in Path(f"/proc/{entry}/cmdline").read_bytes()
                ):
                    users.append(int(entry))
        if not users:
            return
        assert time.monotonic() < deadline, f"{users} still work in {folder}"
        time.sleep(0.1)
