"""Fixtures: a real daemon per test, on a private state folder, driven through the real CLI.

Everything here runs for real: CRIU as root, the daemon as a subprocess, workloads as process
trees. Every process a test starts is killed by PID at the end, the daemon last. The helpers
(Daemon, Moto, ports, process trees) are in tests/support/, shared with bench/.

Only what runs CRIU needs root: Daemon (and so the `daemon` and `counter` fixtures) fails the
test at once without root or criu; the pure unit tests run as any user.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import COUNTER, Daemon, Moto, free_port, http_get


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
    d.start()
    try:
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


@pytest.fixture
def moto() -> Iterator[Moto]:
    m = Moto()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def bucket(moto: Moto) -> str:
    name = f"ckpt-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    moto.client().create_bucket(Bucket=name)
    return name
