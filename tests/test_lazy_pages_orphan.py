"""`criu lazy-pages` never outlives a daemon killed as it starts a lazy restore.

The daemon starts it on the restore folder before the restore itself; killed -9 at that
moment (a test hook pauses `LazyRestore.begin` right after `criu lazy-pages` is started), it
left it waiting forever for a restore that would never come, with the folder. It is now the
guard's child, and the guard kills it when the daemon's pipe closes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.criu import Criu, DumpOptions
from checkpointer.criu.lazy.restore import PAUSE_AFTER_LAZY_PAGES
from checkpointer.host import children
from tests.support import require_root_and_criu

# Plays the daemon: begins a lazy restore of argv[1] (paused by the test hook), no more.
DAEMON = """
import sys
from pathlib import Path
from checkpointer.criu import Criu
from checkpointer.criu.lazy import LazyRestore
criu = Criu("criu", Path(sys.argv[2]), timeout=60)
LazyRestore.begin(criu, Path(sys.argv[1]), "orphan")
"""


@pytest.fixture
def images() -> Iterator[Path]:
    """A restore folder of a dumped `sleep` (the inventory and process tree are what
    `criu lazy-pages` reads as it starts)."""
    require_root_and_criu()
    work = Path(tempfile.mkdtemp(prefix="ckpt-orphan-"))
    try:
        os.chmod(work, 0o700)
        images = work / "images"
        images.mkdir(mode=0o700)
        proc = children.spawn(
            ["sleep", "600"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            Criu("criu", work / "failed-logs", timeout=60).dump(
                proc.pid, images, DumpOptions(), "orphan"
            )
        finally:
            children.reap(proc, kill=True)
        yield images
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lazy_pages_of(folder: Path) -> list[int]:
    """The `criu lazy-pages` processes working on `folder`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"lazy-pages" in argv and str(folder).encode() in argv:
                    found.append(int(entry))
    return found


def test_lazy_pages_dies_with_a_daemon_killed_right_after_starting_it(images: Path) -> None:
    mark = images.parent / "paused"
    env = {**os.environ, PAUSE_AFTER_LAZY_PAGES: str(mark)}
    root = str(Path(__file__).resolve().parents[1])
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(images), str(images.parent / "failed-logs")],
        cwd=root,
        env={**env, "PYTHONPATH": root},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        listening = images / "lazy-pages.socket"  # killed sooner, it fails to start by itself
        while not (mark.exists() and listening.exists() and lazy_pages_of(images)):
            assert daemon.poll() is None, daemon.communicate()[1].decode()
            assert time.monotonic() < deadline, "criu lazy-pages never started"
            time.sleep(0.01)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        deadline = time.monotonic() + 5
        while (left := lazy_pages_of(images)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], "criu lazy-pages outlived the daemon that started it"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for pid in lazy_pages_of(images):  # never leave one behind, even when the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
