"""Fixtures: a real daemon per test, on a private state folder, driven through the real CLI.

Everything here runs for real: CRIU as root, the daemon as a subprocess, workloads as process
trees. Every process a test starts is killed by PID at the end, the daemon last. The helpers
(Daemon, Moto, ports, process trees) are in tests/support/, shared with bench/.

Only what runs CRIU needs root: Daemon (and so the `daemon` and `counter` fixtures) fails the
test at once without root or criu; the pure unit tests run as any user.

In parallel (`make test`: pytest-xdist, `--dist loadgroup`), each worker process has its own
temporary folder (every mkdtemp of its tests lands there), its own ports and test subnets
(tests/support/workers.py), its own moto_server, and at its end checks that nothing its tests
started still runs. A file with fixtures shared by its tests (scope module or class) runs
whole on one worker, in its order (tests/support/scheduling.py).

Every test is also checked on its own (`nothing_left_behind`, tests/support/leftovers.py): a
test that leaves processes, mounts, network namespaces, /dev/shm or temporary folders behind
fails, naming them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import COUNTER, Daemon, Moto, free_port, http_get, leftovers
from tests.support.processes import working_in
from tests.support.workers import worker


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With `--dist loadgroup` (as `make test` runs), xdist's scheduler with the files that
    share fixtures kept whole (tests/support/scheduling.py)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.support.scheduling import FilesThatShare

    return FilesThatShare(config, log, root=config.rootpath)


@pytest.fixture(scope="session", autouse=True)
def worker_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """This worker's own temporary folder for the whole run (tempfile's default while it
    runs), and at the end: nothing started in it or in pytest's tmp_path still runs. What is
    left is killed by PID and the run fails naming it."""
    index, _ = worker()
    basetemp = tmp_path_factory.getbasetemp()  # first: pytest keeps it (failed tests' files)
    root = Path(tempfile.mkdtemp(prefix=f"ckpt-w{index}-"))
    before, tempfile.tempdir = tempfile.tempdir, str(root)
    folders = [root, basetemp]
    try:
        yield folders
    finally:
        tempfile.tempdir = before
        left = working_in(folders)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes the tests started are still running: {left}"


@pytest.fixture(autouse=True)
def nothing_left_behind(worker_folders: list[Path]) -> Iterator[None]:
    """Fail a test that leaves anything behind (tests/support/leftovers.py). Autouse, so it
    is set up before the test's other fixtures and checks after their teardown."""
    token = secrets.token_hex(8)
    temp_root = worker_folders[0]
    before = leftovers.snapshot(worker_folders, temp_root)
    os.environ[leftovers.TOKEN_VAR] = token  # every process the test starts inherits it
    try:
        yield
    finally:
        del os.environ[leftovers.TOKEN_VAR]
    left = leftovers.left_behind(before, temp_root, token)
    if left:
        pytest.fail("the test left behind:\n  " + "\n  ".join(left), pytrace=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ckpt-test-"))
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    d = Daemon(workdir)
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture
def counter(daemon: Daemon) -> Iterator[tuple[Daemon, int]]:
    """The seed workload: a managed HTTP server counting requests in memory (manual restore)."""
    port = free_port()
    # Automatic restore is off: these tests kill the tree and restore it by hand.
    daemon.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
    http_get(port)  # wait until it listens; this is request 1
    yield daemon, port


@pytest.fixture(scope="session")
def moto_servers() -> Iterator[list[Moto]]:
    """This worker's moto_server (started by the first test that needs one), stopped at the
    end. Starting one takes about a second; 37 tests ask for one."""
    servers: list[Moto] = []
    try:
        yield servers
    finally:
        for m in servers:
            m.stop()


@pytest.fixture
def moto(moto_servers: list[Moto]) -> Iterator[Moto]:
    """An empty S3 server: this worker's, emptied after each test (moto's reset: every bucket
    and object gone), resumed if the test paused it, started again if it died."""
    if not moto_servers or moto_servers[0].proc.poll() is not None:
        moto_servers[:] = [Moto()]
        leftovers.outlives_test(moto_servers[0].proc.pid)  # kept for this worker's later tests
    m = moto_servers[0]
    try:
        yield m
    finally:
        m.resume()
        m.reset()


@pytest.fixture
def bucket(moto: Moto) -> str:
    name = f"ckpt-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    moto.client().create_bucket(Bucket=name)
    return name
