"""The command line itself: global options before the command name, and what commands print.

No CRIU and no real daemon here: either no daemon at all (the error must name the socket), or
a fake one on a Unix socket that answers each request with a canned report.
"""

from __future__ import annotations

import json
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpointer.config.durations import format_duration

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "checkpointer.cli"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "No such option" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ckpt-cli-"))  # short: a socket path has ~107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def config(base: Path, name: str) -> Path:
    """A config whose socket is base/NAME.sock, where nothing listens unless a test serves."""
    path = base / f"{name}.yaml"
    path.write_text(f"state_dir: {base / 'state'}\nsocket: {base / name}.sock\n")
    return path


def test_config_before_the_command_is_the_same_as_after(base: Path) -> None:
    cfg = config(base, "a")
    for command in (("status",), ("list", "web"), ("checkpoint", "web"), ("prune",)):
        before = cli("--config", cfg, *command)
        after = cli(*command, "--config", cfg)
        msg = one_line_error(before, code=1)
        assert "daemon is not running" in msg and f"{base / 'a'}.sock" in msg
        assert (after.returncode, after.stdout, after.stderr) == (
            before.returncode,
            before.stdout,
            before.stderr,
        )


def test_missing_config_before_the_command(base: Path) -> None:
    missing = base / "nonexistent.yaml"
    before = cli("--config", missing, "status")
    msg = one_line_error(before, code=2)
    assert f"config file {missing} does not exist" in msg
    assert cli("status", "--config", missing).stderr == before.stderr
    msg = one_line_error(cli("--config", "/nonexistent", "status"), code=2)
    assert "config file /nonexistent does not exist" in msg


def test_option_after_the_command_wins(base: Path) -> None:
    a, b = config(base, "a"), config(base, "b")
    msg = one_line_error(cli("--config", a, "status", "--config", b), code=1)
    assert f"{base / 'b'}.sock" in msg and f"{base / 'a'}.sock" not in msg
    msg = one_line_error(cli("--config", base / "nonexistent.yaml", "status", "--config", a), 1)
    assert f"{base / 'a'}.sock" in msg
    msg = one_line_error(cli("--config", a, "status", "--config", base / "nonexistent.yaml"), 2)
    assert "nonexistent.yaml does not exist" in msg


class FakeDaemon:
    """Answers each request on a Unix socket with the canned result for its op."""

    def __init__(self, path: Path, results: dict[str, Any]) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                req = json.loads(self.rfile.readline())
                fake.requests.append(req)
                reply = {"ok": True, "result": results[req["op"]]}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


STATUS = [
    {
        "name": "web",
        "kind": "managed",
        "state": "running",
        "pid": 4242,
        "exit_status": None,
        "command": ["sleep", "1000"],
        "schedule": "every 30s",
        "last_checkpoint": "20240501T120000Z-ab12",
        "last_checkpoint_age_seconds": 90.0,
        "next_checkpoint": "2024-05-01T12:02:00+00:00",
        "last_error": None,
        "failed_reason": None,
        "restores": [],
        "bad_checkpoints": [],
        "log": None,
        "busy": False,
    }
]
RESULTS: dict[str, Any] = {
    "status": STATUS,
    "run": STATUS[0],
    "checkpoint": {
        "workload": "web",
        "id": "20240501T120000Z-ab12",
        "size_bytes": 12_345_678,
        "new_bytes": 1_500_000,
        "duration_seconds": 1.234,
        "dump_stats": {"frozen_time": 0.0421},
    },
    "list": [
        {
            "id": "20240501T120000Z-ab12",
            "created": "2024-05-01T12:00:00.123456+00:00",
            "size_bytes": 12_345_678,
            "new_bytes": 1_500_000,
            "frozen_seconds": 0.0421,
            "host": "h",
        }
    ],
    "unregister": {"workload": "web", "stopped": True},
    "pin": {"workload": "web", "id": "20240501T120000Z-ab12", "pinned": True},
    "rollback": {
        "workload": "web",
        "checkpoint": "20240501T120000Z-ab12",
        "pid": 4343,
        "reason": "rollback",
        "duration_seconds": 0.5,
        "restore_stats": {},
        "source": "repository",
    },
    "restore": {
        "workload": "web",
        "checkpoint": "20240501T120000Z-ab12",
        "pid": 4444,
        "reason": "manual",
        "duration_seconds": 0.25,
        "restore_stats": {},
        "source": "kept image",
    },
    "prune": {
        "dry_run": True,
        "checkpoints": [
            {
                "workload": "web",
                "id": "20240501T120000Z-ab12",
                "created": "2024-05-01T12:00:00+00:00",
                "action": "remove",
                "reasons": ["beyond keep_last 1"],
            }
        ],
        "gc": {"deleted_packs": 3, "kept_young_unreferenced": 1, "referenced_packs": 7},
    },
}


@pytest.fixture
def fake(base: Path) -> Iterator[tuple[FakeDaemon, Path]]:
    cfg = config(base, "fake")
    d = FakeDaemon(base / "fake.sock", RESULTS)
    try:
        yield d, cfg
    finally:
        d.close()


def test_json_before_the_command(fake: tuple[FakeDaemon, Path]) -> None:
    d, cfg = fake
    before = cli("--json", "--config", cfg, "status")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == STATUS
    assert cli("status", "--config", cfg, "--json").stdout == before.stdout
    assert cli("--json", "status", "--config", cfg).stdout == before.stdout
    assert cli("--config", cfg, "status", "--json").stdout == before.stdout
    table = cli("--config", cfg, "status")
    assert table.returncode == 0 and "NAME" in table.stdout and "web" in table.stdout
    assert [r["op"] for r in d.requests] == ["status"] * 5
    assert d.requests[0]["args"] == {"name": None}


def test_json_before_a_command_that_does_not_report_is_a_usage_error(base: Path) -> None:
    r = cli("--json", "daemon", "--config", config(base, "a"))
    assert r.returncode == 2 and "--json does not apply to daemon" in r.stderr


def test_what_commands_print(fake: tuple[FakeDaemon, Path]) -> None:
    d, cfg = fake

    def out(*args: str) -> str:
        r = cli("--config", cfg, *args)  # before: `run NAME -- CMD` takes all that follows
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert out("run", "web", "--", "sleep", "1000") == "started web: pid 4242\n"
    assert out("checkpoint", "web") == (
        "20240501T120000Z-ab12  12.3 MB image, 1.5 MB newly stored, frozen 42 ms, total 1.23 s\n"
    )
    assert out("unregister", "web") == "unregistered web and stopped its processes\n"
    assert out("pin", "web", "20240501T120000Z-ab12") == "pinned 20240501T120000Z-ab12 of web\n"
    assert out("rollback", "web", "--back", "1") == (
        "rolled web back to 20240501T120000Z-ab12: pid 4343\n"
    )
    listing = out("list", "web")
    assert "2024-05-01 12:00:00" in listing and "12.3 MB" in listing and "42 ms" in listing
    status = out("status")
    assert "running" in status and "4242" in status and format_duration(90.0) in status
    assert "12:02:00" in status
    prune = out("prune", "--dry-run")
    assert "would remove" in prune and "beyond keep_last 1" in prune
    assert prune.endswith(
        "garbage collection: would remove 3 unreferenced pack(s); "
        "1 kept as younger than the grace period\n"
    )
    ops = [r["op"] for r in d.requests]
    assert ops == ["run", "checkpoint", "unregister", "pin", "rollback", "list", "status", "prune"]
    assert d.requests[3]["args"] == {
        "name": "web",
        "checkpoint_id": "20240501T120000Z-ab12",
        "unpin": False,
    }


def test_usage_errors_are_one_line(base: Path) -> None:
    """Click's three-line block (usage, a hint, the error) becomes the one line the README
    promises, naming the problem and where to read the usage."""
    for args, words in (
        (("restore",), ["Missing argument 'NAME'", "`checkpointer restore --help`"]),
        (("status", "--bogus"), ["No such option '--bogus'", "`checkpointer status --help`"]),
        (("bogus",), ["No such command 'bogus'", "`checkpointer --help`"]),
        (("rollback", "web"), ["give exactly one of --to ID and --back N"]),
    ):
        r = cli(*args, "--config", config(base, "a"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]
    assert cli("--help").returncode == 0 and "Usage: checkpointer" in cli("--help").stdout


# The commands that talk to the daemon start without pydantic (the config's schema) and rich
# (tables): ~0.4 s of a CLI process's ~0.5 s, added to every restore's command-to-answer.
_MODULES_AFTER = """
import sys
from checkpointer.cli.commands import main
sys.argv = ["checkpointer", *sys.argv[1:]]
try:
    main()
finally:
    heavy = {m.split(".")[0] for m in sys.modules} & {"pydantic", "rich", "boto3"}
    print("loaded:", ",".join(sorted(heavy)), file=sys.stderr)
"""


def test_commands_that_talk_to_the_daemon_load_neither_pydantic_nor_rich(
    fake: tuple[FakeDaemon, Path],
) -> None:
    d, cfg = fake

    def loaded(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-c", _MODULES_AFTER, "--config", str(cfg), *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stderr.strip().splitlines()[-1]

    pin = ("pin", "web", "20240501T120000Z-ab12")
    talking = (("checkpoint", "web"), ("restore", "web"), ("status", "--json"), pin)
    for args in talking:
        assert loaded(*args) == "loaded:", args
    assert loaded("status") == "loaded: rich"  # a table: this check sees what loads
    assert [r["op"] for r in d.requests] == ["checkpoint", "restore", "status", "pin", "status"]


def test_a_bad_config_is_reported_when_no_daemon_answers(fake: tuple[FakeDaemon, Path]) -> None:
    """Without a daemon, the config's own error is the useful one (the commands do not
    validate the whole file first: a daemon that answers runs on the one it validated)."""
    d, cfg = fake
    cfg.write_text(cfg.read_text() + "storage:\n  bakend: local\n")
    assert cli("checkpoint", "web", "--config", cfg).returncode == 0
    cfg.write_text(cfg.read_text().replace("fake.sock", "none.sock"))
    msg = one_line_error(cli("checkpoint", "web", "--config", cfg), code=2)
    assert "storage.bakend: unknown key" in msg and "backend" in msg
    assert [r["op"] for r in d.requests] == ["checkpoint"]


def test_a_config_the_daemon_refuses_reaches_no_daemon(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`state_dir:` left empty is refused by the daemon; the CLI read it as "not set" and sent
    the command (here `unregister`) to the default socket, where the host's own daemon listens.
    In-process, to put that default socket under `base`."""
    from click.testing import CliRunner

    import checkpointer.config.document as document
    from checkpointer.cli.commands import cli as group

    default = base / "default"
    default.mkdir()
    monkeypatch.setattr(document, "DEFAULT_STATE_DIR", default)
    d = FakeDaemon(default / "checkpointer.sock", RESULTS)
    cfg = base / "second.yaml"
    try:
        for text in ("state_dir:\n", "state_dir:\nsocket:\n", "socket:\nstate_dir: ~\n"):
            cfg.write_text(text)
            r = CliRunner().invoke(group, ["unregister", "web", "--config", str(cfg)])
            assert r.exit_code == 2, r.output
            assert r.output.strip() == (
                f"error: config file {cfg}: state_dir: left empty; write a folder, "
                f"or remove the key for the default {default}"
            )
        assert d.requests == []
        cfg.write_text("socket:\n")  # left empty, `socket` is not set: the default's
        r = CliRunner().invoke(group, ["unregister", "web", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        assert [req["op"] for req in d.requests] == ["unregister"]
    finally:
        d.close()


def test_a_config_that_is_not_utf8_is_named(base: Path) -> None:
    cfg = base / "latin1.yaml"
    cfg.write_bytes(f"state_dir: {base}/caf\xe9\n".encode("latin-1"))
    for command in ("status", "daemon"):  # the socket's reader, and the schema's
        msg = one_line_error(cli(command, "--config", cfg), code=2)
        assert f"config file {cfg} is not UTF-8 text" in msg and "save it as UTF-8" in msg, msg
