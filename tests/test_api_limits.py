"""The API server's limits and the client's side of the protocol, against the real ApiServer on
a Unix socket with fake handlers (no daemon, no root): a capped request line, a deadline for
reading it, a clear protocol error for requests of the wrong shape, and what the CLI's client
and the CLI itself make of the answers."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpointer.api import Op
from checkpointer.cli.client import RemoteError, call
from checkpointer.daemon import api_server
from checkpointer.daemon.api_server import MAX_REQUEST_BYTES, ApiServer
from checkpointer.errors import CheckpointerError
from tests.support.paths import CLI

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

# The daemon's 10 s deadline, shortened here: the tests measure against the module's value.
READ_TIMEOUT = 2.0


def fake_status(name: str | None = None) -> list[dict[str, Any]]:
    return [{"name": name or "web", "state": "running", "pid": 4242}]


def fake_checkpoint(
    name: str, wait: bool = True, progress: Callable[[int, int], None] | None = None
) -> Any:
    if name == "broken":
        raise RuntimeError("disk on fire")
    if name == "missing":
        raise CheckpointerError(f"no workload named {name!r}")
    if progress:
        for done in (0, 50, 100):
            progress(done, 100)
    return {"id": "c1", "name": name}


@pytest.fixture
def sock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real ApiServer on TMP/api.sock serving fake `status` and `checkpoint` handlers."""
    monkeypatch.setattr(api_server, "REQUEST_READ_TIMEOUT", READ_TIMEOUT)
    path = tmp_path / "api.sock"
    server = ApiServer(path, {"status": fake_status, "checkpoint": fake_checkpoint})
    server.start()
    try:
        yield path
    finally:
        server.stop()


def connect(path: Path, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_reply(s: socket.socket) -> dict[str, Any] | None:
    """The first non-progress line the server sends, or None if it closes without one."""
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if "progress" not in msg:
                return dict(msg)


def ask(path: Path, raw: bytes) -> dict[str, Any] | None:
    with connect(path) as s:
        s.sendall(raw)
        return read_reply(s)


def assert_answers_status(path: Path) -> None:
    reply = ask(path, json.dumps({"op": "status", "args": {}}).encode() + b"\n")
    assert reply is not None and reply["ok"] is True, reply


def test_oversized_request_line_is_refused(sock: Path) -> None:
    with connect(sock) as s:
        # More than the cap and no newline at all: the server must stop reading. It may answer
        # and close while this is still sending.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b'{"op": "status", "args": {"x": "' + b"x" * (MAX_REQUEST_BYTES + 4096))
        reply = read_reply(s)
    assert reply is not None
    assert reply["ok"] is False
    assert reply["kind"] == "protocol"
    assert "request too large" in reply["error"]
    assert_answers_status(sock)


def test_a_request_just_under_the_cap_is_read(sock: Path) -> None:
    pad = "x" * (MAX_REQUEST_BYTES - 100)
    reply = ask(sock, json.dumps({"op": "no-such-op", "pad": pad}).encode() + b"\n")
    assert reply is not None and reply["kind"] == "protocol"
    assert "unknown op 'no-such-op'" in reply["error"]


def test_requests_of_the_wrong_shape_get_a_protocol_error(sock: Path) -> None:
    cases = {
        b'{"op": ["x"]}\n': "`op` must be a string, got an array",
        b'{"op": {"a": 1}}\n': "`op` must be a string, got an object",
        b'{"op": 3}\n': "`op` must be a string, got a number",
        b'{"op": "status", "args": ["web"]}\n': "`args` must be an object, got an array",
        b'{"op": "status", "args": null}\n': "`args` must be an object, got null",
        b'{"args": {}}\n': "no `op`",
        b'["status"]\n': "expected a JSON object, got an array",
        b'"status"\n': "expected a JSON object, got a string",
        b"not json\n": "not a line of JSON",
        b"\xff\xfe\n": "not a line of JSON",
        b"[" * 100_000 + b"\n": "not a line of JSON",
        b'{"op": "status", "args": {"no_such_arg": 1}}\n': (
            "bad arguments for op 'status': unknown field `no_such_arg` (it takes: name)"
        ),
        b'{"op": "checkpoint", "args": {"name": 7}}\n': (
            "bad arguments for op 'checkpoint': field `name`: Input should be a valid string, "
            "got a number"
        ),
        b'{"op": "checkpoint", "args": {"name": "web", "wait": "yes"}}\n': (
            "field `wait`: Input should be a valid boolean, got a string"
        ),
        b'{"op": "checkpoint", "args": {}}\n': "missing field `name`",
        b'{"op": "status", "args": {"name": ["web"]}}\n': "field `name`",
    }
    for raw, problem in cases.items():
        reply = ask(sock, raw)
        assert reply is not None, raw[:40]
        assert reply["ok"] is False, (raw[:40], reply)
        assert reply["kind"] == "protocol", (raw[:40], reply)
        assert problem in reply["error"] and "\n" not in reply["error"], (raw[:40], reply)
    assert_answers_status(sock)


def test_a_silent_client_blocks_no_one_and_is_dropped(sock: Path) -> None:
    idle = connect(sock, timeout=READ_TIMEOUT + 20)
    got: list[dict[str, Any] | None] = []
    waited: list[float] = []
    try:
        started = time.monotonic()

        def wait_idle() -> None:
            got.append(read_reply(idle))
            waited.append(time.monotonic() - started)

        reader = threading.Thread(target=wait_idle)
        reader.start()
        # While the first client says nothing, others are answered at once.
        for _ in range(3):
            t0 = time.monotonic()
            assert_answers_status(sock)
            assert time.monotonic() - t0 < READ_TIMEOUT / 2
        reader.join(timeout=READ_TIMEOUT + 20)
        assert not reader.is_alive(), "the idle client was never dropped"
    finally:
        with contextlib.suppress(OSError):
            idle.close()
    # Dropped after the deadline, with a reply that says why, and the connection closed.
    assert READ_TIMEOUT - 0.5 <= waited[0] <= READ_TIMEOUT + 10
    reply = got[0]
    assert reply is not None and reply["kind"] == "protocol"
    assert "no complete request within" in reply["error"]
    assert_answers_status(sock)


def test_a_slow_trickle_does_not_extend_the_deadline(sock: Path) -> None:
    """The deadline is for the whole line, not for each read."""
    with connect(sock, timeout=READ_TIMEOUT + 20) as s:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A byte every fifth of the deadline, until the server answers (or gives up on us).
            while time.monotonic() - started < READ_TIMEOUT + 10:
                s.sendall(b" ")
                readable, _, _ = select.select([s], [], [], READ_TIMEOUT / 5)
                if readable:
                    break
        reply = read_reply(s)
        elapsed = time.monotonic() - started
    assert reply is not None and "no complete request within" in reply["error"]
    assert elapsed < READ_TIMEOUT + 5
    assert_answers_status(sock)


def test_the_client_gets_results_progress_and_the_daemons_errors(sock: Path) -> None:
    """The CLI's client against the server: a result as the handler returned it, progress
    before it, a CheckpointerError as its kind and message, anything else as `internal`."""
    assert call(sock, Op.STATUS, name="db") == fake_status("db")
    seen: list[tuple[int, int]] = []
    result = call(sock, Op.CHECKPOINT, on_progress=lambda d, t: seen.append((d, t)), name="web")
    assert result == {"id": "c1", "name": "web"}
    assert seen and seen[-1] == (100, 100)
    with pytest.raises(RemoteError) as missing:
        call(sock, Op.CHECKPOINT, name="missing")
    assert "no workload named 'missing'" in str(missing.value)
    with pytest.raises(RemoteError) as broken:
        call(sock, Op.CHECKPOINT, name="broken")
    assert broken.value.kind == "internal" and "disk on fire" in str(broken.value)


def test_the_cli_prints_the_daemons_answer_and_its_error_in_one_line(
    sock: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nsocket: {sock}\n")
    ok = subprocess.run(
        [*CLI, "status", "db", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == fake_status("db")
    bad = subprocess.run(
        [*CLI, "checkpoint", "missing", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip() == "error: no workload named 'missing'", bad.stderr
