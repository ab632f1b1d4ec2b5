"""A managed workload starts with a clean environment: a fixed base plus its own `env`, nothing
of the daemon's (which may hold the repository's AWS credentials)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.workloads.managed import BASE_ENV
from tests.support import Daemon

DAEMON_ONLY = {
    "AWS_SECRET_ACCESS_KEY": "daemon-secret-do-not-leak",
    "AWS_ACCESS_KEY_ID": "AKIADAEMONONLY",
    "CKPT_TEST_DAEMON_ONLY": "daemon-only-value",
}


@pytest.fixture
def daemon_with_secrets(workdir: Path) -> Iterator[Daemon]:
    d = Daemon(workdir)
    d.env = dict(DAEMON_ONLY)
    try:
        d.start()
        yield d
    finally:
        d.stop()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().split("=", 1) for item in raw.split(b"\0") if item)
    return {k: v for k, v in pairs}


def test_the_daemon_has_the_variables_the_workload_must_not_get(
    daemon_with_secrets: Daemon,
) -> None:
    assert daemon_with_secrets.proc is not None
    env = environ_of(daemon_with_secrets.proc.pid)
    for key, value in DAEMON_ONLY.items():
        assert env.get(key) == value


def test_managed_workload_gets_base_and_its_own_env_only(daemon_with_secrets: Daemon) -> None:
    d = daemon_with_secrets
    d.cli(
        "run",
        "envy",
        "--no-auto-restore",
        "--env",
        "FOO=bar",
        "--env",
        "PATH=/bin:/usr/bin",
        "--",
        "sleep",
        "100000",
    )
    pid = d.pid("envy")
    deadline = time.monotonic() + 10
    while (env := environ_of(pid)).get("FOO") != "bar" and time.monotonic() < deadline:
        time.sleep(0.05)  # /proc/PID/environ is the exec'd program's once it has exec'd
    assert env["FOO"] == "bar"
    assert env["PATH"] == "/bin:/usr/bin"  # the workload's own env wins over the base
    assert env["LANG"] == BASE_ENV["LANG"]
    assert env["HOME"] == BASE_ENV["HOME"]
    assert set(env) == {"FOO", "PATH", "LANG", "HOME"}
    assert not [k for k in env if k.startswith("AWS_")]
    assert "CKPT_TEST_DAEMON_ONLY" not in env


def test_base_path_finds_commands(daemon_with_secrets: Daemon) -> None:
    """With no `env`, the base PATH is the workload's: `sleep` is found through it."""
    d = daemon_with_secrets
    d.cli("run", "plain", "--no-auto-restore", "--", "sleep", "100000")
    env = environ_of(d.pid("plain"))
    assert env == BASE_ENV
