"""The daemon or a lazy restore's guard killed -9 during the restore.

The daemon killed while `criu restore` of a lazy restore runs: at no moment may the tree
run on zero pages (a page that never came reads as zeroes once nobody holds its userfaultfd).
It is killed (the guard learnt it from CRIU's post-restore hook, before it ran), or never
resumed (CRIU aborts the restore when the hook finds no guard), and the next daemon restores
the checkpoint in full with its state.

The window is made wide with a wrapper around criu: the lazy `criu restore` pauses, once,
either inside the restore (an action script of the wrapper's at post-restore, before the tree
resumes) or after CRIU has resumed the tree and exited, before the daemon hears of it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import CLI, Daemon, free_port, http_get, kill_tree, tree_pids
from tests.support.lazy import pausing_criu
from tests.support.paths import PROGRAMS

MB = 300  # over a second to arrive: the daemon dies with most pages still missing


def wait_for_file(path: Path, timeout: float, d: Daemon, errors: Path) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, (
            f"no lazy restore paused: {errors.read_text()}\n{d.log.read_text()[-3000:]}"
        )
        time.sleep(0.005)
    return path.read_text().strip()


@pytest.mark.parametrize("when", ["after-resume", "before-resume"])
def test_the_daemon_killed_during_a_lazy_criu_restore_never_leaves_the_tree_on_zero_pages(
    workdir: Path, when: str
) -> None:
    wrapper, mark = pausing_criu(workdir, when)
    d = Daemon(workdir, f"criu:\n  binary: {wrapper}\n")
    restore: subprocess.Popen[bytes] | None = None
    root: int | None = None
    try:
        d.start()
        port = free_port()
        d.cli("run", "sums", "--no-auto-restore", "--lazy-restore", "--", sys.executable,
              str(PROGRAMS / "checksum_server.py"), str(port), str(MB), "7")  # fmt: skip
        right = http_get(port, timeout=60)
        d.checkpoint("sums")
        kill_tree(d.pid("sums"))
        d.drop_kept_images()  # the pages come from the repository, lazily
        errors = workdir / "restore.err"
        with open(errors, "wb") as err:
            restore = subprocess.Popen(
                [*CLI, "restore", "sums", "--config", str(d.config)],
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        root = int(wait_for_file(mark, 120, d, errors))
        assert d.proc is not None
        d.proc.kill()  # kill -9, with `criu restore` still running
        d.proc.wait()
        deadline = time.monotonic() + 15
        while Path(f"/proc/{root}").exists() and time.monotonic() < deadline:
            try:
                answer = http_get(port, timeout=0.5)
            except OSError:
                continue
            assert answer == right, "the tree ran on pages that never came"
        assert not Path(f"/proc/{root}").exists(), "the tree outlived its daemon and its pages"
        log = d.log.read_text()
        if when == "after-resume":  # killed by the guard, not by luck
            assert f"killed the restored tree (pid {root})" in log, log[-3000:]
        else:  # never resumed: the hook found no guard, CRIU aborted the restore
            assert "the daemon died during the restore" in log, log[-3000:]
        _wait_gone("criu restore", workdir, 20)  # the orphaned CRIU ends by itself
        d.start()
        d.cli("restore", "sums", "--full")
        assert http_get(port, timeout=60) == right
    finally:
        if restore is not None:
            restore.wait(60)
        if root is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(root, 9)
        d.stop()


def _wait_gone(what: str, folder: Path, timeout: float) -> None:
    """Wait until no process whose command line holds `what` and `folder` runs."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                    if what.encode() in cmd and str(folder).encode() in cmd:
                        left.append(int(entry))
        if not left:
            return
        assert time.monotonic() < deadline, f"{what} still runs: {left}"
        time.sleep(0.1)


def test_a_guard_killed_during_a_lazy_restore_is_noticed_and_the_restore_tried_again(
    workdir: Path,
) -> None:
    """Without its guard a lazy restore is one daemon crash away from zero pages: the daemon
    notices its death (before CRIU resumes the tree, or within a tick after), kills the tree,
    and restores the same checkpoint again, marking nothing bad."""
    d = Daemon(workdir)
    try:
        d.start()
        port = free_port()
        d.cli("run", "sums", "--lazy-restore", "--", sys.executable,
              str(PROGRAMS / "checksum_server.py"), str(port), str(MB), "7")  # fmt: skip
        right = http_get(port, timeout=60)
        cid = d.checkpoint("sums")
        d.drop_kept_images()
        kill_tree(d.pid("sums"))  # the policy restores it, lazily
        guard = _first(lambda: _guards_of(d), 60)
        os.kill(guard, 9)
        st = d.wait_for(
            "sums",
            lambda s: s["state"] == "running" and s["restores"][-1]["result"] == "ok",
            timeout=120,
        )
        retried = [r for r in st["restores"] if r["result"] == "retry"]
        assert retried and "guard" in retried[0]["detail"], st["restores"]
        assert st["bad_checkpoints"] == [] and st["restores"][-1]["checkpoint"] == cid
        assert http_get(port, timeout=60) == right
    finally:
        d.stop()


def _first(find: Callable[[], list[int]], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not (found := find()):
        assert time.monotonic() < deadline, "never found"
        time.sleep(0.005)
    return found[0]


def _guards_of(daemon: Daemon) -> list[int]:
    """The lazy restore guards the daemon started (its children, found by name)."""
    assert daemon.proc is not None
    found = []
    for pid in tree_pids(daemon.proc.pid)[1:]:
        with contextlib.suppress(OSError):
            if b"checkpointer.criu.lazy.guard" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found
