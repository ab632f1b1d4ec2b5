"""The API server's limits, spoken to over a raw Unix socket: a capped request line, a deadline
for reading it, and a clear protocol error for requests of the wrong shape."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

from checkpointer.daemon.api_server import MAX_REQUEST_BYTES, REQUEST_READ_TIMEOUT
from tests.support import Daemon


def sock_path(daemon: Daemon) -> Path:
    return daemon.state / "checkpointer.sock"


def connect(daemon: Daemon, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path(daemon)))
    return s


def read_reply(s: socket.socket) -> dict[str, Any] | None:
    """The first non-progress line the daemon sends, or None if it closes without one."""
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


def ask(daemon: Daemon, raw: bytes) -> dict[str, Any] | None:
    with connect(daemon) as s:
        s.sendall(raw)
        return read_reply(s)


def assert_answers_status(daemon: Daemon) -> None:
    reply = ask(daemon, json.dumps({"op": "status", "args": {}}).encode() + b"\n")
    assert reply is not None and reply["ok"] is True, reply


def test_oversized_request_line_is_refused(daemon: Daemon) -> None:
    with connect(daemon) as s:
        # More than the cap and no newline at all: the server must stop reading. It may answer
        # and close while this is still sending.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b'{"op": "status", "args": {"x": "' + b"x" * (MAX_REQUEST_BYTES + 4096))
        reply = read_reply(s)
    assert reply is not None
    assert reply["ok"] is False
    assert reply["kind"] == "protocol"
    assert "request too large" in reply["error"]
    assert_answers_status(daemon)


def test_a_request_just_under_the_cap_is_read(daemon: Daemon) -> None:
    pad = "x" * (MAX_REQUEST_BYTES - 100)
    reply = ask(daemon, json.dumps({"op": "no-such-op", "pad": pad}).encode() + b"\n")
    assert reply is not None and reply["kind"] == "protocol"
    assert "unknown op 'no-such-op'" in reply["error"]


def test_requests_of_the_wrong_shape_get_a_protocol_error(daemon: Daemon) -> None:
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
        b'{"op": "status", "args": {"no_such_arg": 1}}\n': "bad arguments for op 'status'",
    }
    for raw, problem in cases.items():
        reply = ask(daemon, raw)
        assert reply is not None, raw[:40]
        assert reply["ok"] is False, (raw[:40], reply)
        assert reply["kind"] == "protocol", (raw[:40], reply)
        assert problem in reply["error"], (raw[:40], reply)
    assert_answers_status(daemon)


def test_a_silent_client_blocks_no_one_and_is_dropped(daemon: Daemon) -> None:
    idle = connect(daemon, timeout=REQUEST_READ_TIMEOUT + 20)
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
            assert_answers_status(daemon)
            assert time.monotonic() - t0 < REQUEST_READ_TIMEOUT / 2
        assert daemon.cli("status").returncode == 0
        reader.join(timeout=REQUEST_READ_TIMEOUT + 20)
        assert not reader.is_alive(), "the idle client was never dropped"
    finally:
        with contextlib.suppress(OSError):
            idle.close()
    # Dropped after the deadline, with a reply that says why, and the connection closed.
    assert REQUEST_READ_TIMEOUT - 1 <= waited[0] <= REQUEST_READ_TIMEOUT + 10
    reply = got[0]
    assert reply is not None and reply["kind"] == "protocol"
    assert "no complete request within" in reply["error"]
    assert_answers_status(daemon)


def test_a_slow_trickle_does_not_extend_the_deadline(daemon: Daemon) -> None:
    """The deadline is for the whole line, not for each read."""
    with connect(daemon, timeout=REQUEST_READ_TIMEOUT + 20) as s:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A byte every fifth of the deadline, until the server answers (or gives up on us).
            while time.monotonic() - started < REQUEST_READ_TIMEOUT + 10:
                s.sendall(b" ")
                readable, _, _ = select.select([s], [], [], REQUEST_READ_TIMEOUT / 5)
                if readable:
                    break
        reply = read_reply(s)
        elapsed = time.monotonic() - started
    assert reply is not None and "no complete request within" in reply["error"]
    assert elapsed < REQUEST_READ_TIMEOUT + 5
    assert_answers_status(daemon)
