"""Bad input: non-zero exit, one line that says what to do, no traceback, nothing damaged."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import CLI, ROOT, Daemon, http_get, kill_tree


def one_line_error(r: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_unknown_workload(daemon: Daemon) -> None:
    for args in (
        ("checkpoint", "nosuch"),
        ("status", "nosuch"),
        ("restore", "nosuch"),
        ("rollback", "nosuch", "--back", "1"),
        ("unregister", "nosuch"),
        ("list", "nosuch"),
    ):
        msg = one_line_error(daemon.cli(*args, check=False))
        assert "unknown workload 'nosuch'" in msg and "checkpointer status" in msg


def test_pid_that_does_not_exist(daemon: Daemon) -> None:
    msg = one_line_error(daemon.cli("register", "ghost", "--pid", "4000000", check=False))
    assert "no running process has PID 4000000" in msg
    missing = daemon.base / "missing.pid"
    msg = one_line_error(daemon.cli("register", "ghost", "--pidfile", str(missing), check=False))
    assert "cannot read a PID from pidfile" in msg
    assert daemon.json("status") == []


def test_bad_config_key(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text("state_dir: /tmp/x\nstorage:\n  bakend: local\n")
    r = subprocess.run(
        [*CLI, "status", "--config", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    msg = one_line_error(r, code=2)
    assert "storage.bakend: unknown key" in msg and "backend" in msg


def test_daemon_not_running(workdir: Path) -> None:
    cfg = workdir / "c.yaml"
    cfg.write_text(f"state_dir: {workdir / 'nothing'}\n")
    r = subprocess.run(
        [*CLI, "status", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert "daemon is not running" in one_line_error(r)


def test_restore_of_a_running_workload_is_refused(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    d.checkpoint("web")
    pid = d.pid("web")
    msg = one_line_error(d.cli("restore", "web", check=False))
    assert "is running" in msg and "rollback" in msg
    assert d.pid("web") == pid and http_get(port) == "2"  # untouched


def test_bad_command_and_duplicate_name(daemon: Daemon) -> None:
    msg = one_line_error(daemon.cli("run", "x", "--", "/no/such/program", check=False))
    assert "cannot start '/no/such/program'" in msg
    assert daemon.json("status") == []
    daemon.cli("run", "x", "--", "sleep", "1000")
    msg = one_line_error(daemon.cli("run", "x", "--", "sleep", "1000", check=False))
    assert "already registered" in msg
    msg = one_line_error(daemon.cli("run", "bad/name", "--", "sleep", "1", check=False))
    assert "invalid workload name" in msg


def test_rollback_to_unknown_or_corrupt_checkpoint_keeps_the_tree_running(
    counter: tuple[Daemon, int],
) -> None:
    d, port = counter
    good = d.checkpoint("web")
    pid = d.pid("web")
    msg = one_line_error(
        d.cli("rollback", "web", "--to", "20200101T000000.000000Z-000000", check=False)
    )
    assert "has no checkpoint" in msg
    msg = one_line_error(d.cli("rollback", "web", "--back", "5", check=False))
    assert "cannot go back 5" in msg
    d.drop_kept_images()
    for pack in (d.state / "repository" / "wpacks" / "web").rglob("*.pack"):
        data = bytearray(pack.read_bytes())
        data[len(data) // 3] ^= 0xFF
        pack.write_bytes(bytes(data))
    msg = one_line_error(d.cli("rollback", "web", "--to", good, check=False))
    assert good in msg and "corrupt" in msg
    assert d.pid("web") == pid and http_get(port) == "2"  # the running tree was not touched
    kill_tree(pid)
    msg = one_line_error(d.cli("restore", "web", check=False))
    assert good in msg and "corrupt" in msg


def test_usage_errors_exit_2() -> None:
    r = subprocess.run([*CLI, "rollback", "web"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = subprocess.run(
        [*CLI, "run", "web", "--every", "soon", "--", "x"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "not a duration" in r.stderr
