"""The daemon's API server: one JSON request and one JSON response per line over a Unix socket.

Only root may talk to it: the socket lives in the 0700 state folder, is itself 0600, and the
server checks the peer's uid with SO_PEERCRED, because a request can restore code as root.

Each op's `args` are checked once, here, against its request type (checkpointer/api.py's
REQUESTS): a field the op does not take, a required one missing, or a value of the wrong JSON
type is refused with a one-line protocol error naming the field, before any handler runs. The
handlers' signatures are checked against the same types when the server is built, so the
table and the contract cannot drift apart unnoticed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typing_extensions
from pydantic import TypeAdapter, ValidationError

from checkpointer.api import REQUESTS
from checkpointer.engine.states import ErrorKind
from checkpointer.errors import CheckpointerError, ConfigError
from storage import StorageError

log = logging.getLogger(__name__)
Handler = Callable[..., object]
"""An op's handler: called with the op's request fields as keyword arguments (and
`progress`, a (done, total) callback, if it takes one and the client asked for progress)."""


@dataclass(frozen=True)
class Route:
    """One op: its handler and the request its `args` must be."""

    op: str
    handler: Handler
    fields: frozenset[str]
    adapter: TypeAdapter[Any]
    takes_progress: bool

    @classmethod
    def of(cls, op: str, handler: Handler, request: type[Any]) -> Route:
        """Raises TypeError (a bug, at the daemon's start) unless the handler's parameters
        are the request's fields (besides `progress`), those without a default required."""
        hints = typing.get_type_hints(request, include_extras=True)
        params = inspect.signature(handler).parameters
        takes = {n for n in params if n != "progress"}
        required = {n for n in takes if params[n].default is inspect.Parameter.empty}
        optional = {n for n, t in hints.items() if typing.get_origin(t) is typing.NotRequired}
        if takes != set(hints) or not required <= set(hints) - optional:
            raise TypeError(
                f"the handler of op {op!r} takes {sorted(takes)} ({sorted(required)} "
                f"required), its request {request.__name__} has {sorted(hints)} "
                f"({sorted(optional)} optional)"
            )
        # pydantic reads TypedDicts from typing_extensions only (on Python 3.11), which the
        # CLI should not import for nothing: the same fields, rebuilt here.
        checked: Any = typing_extensions.TypedDict(request.__name__, hints)  # type: ignore[misc]
        return cls(op, handler, frozenset(hints), TypeAdapter(checked), "progress" in params)

    def check(self, args: dict[str, Any]) -> dict[str, Any] | str:
        """The arguments as the handler takes them, or what is wrong with them (one line)."""
        unknown = sorted(set(args) - self.fields)
        if unknown:
            takes = ", ".join(sorted(self.fields)) or "no arguments"
            return f"unknown field `{unknown[0]}` (it takes: {takes})"
        try:
            checked: dict[str, Any] = self.adapter.validate_python(args, strict=True)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            if first["type"] == "missing":
                return f"missing field `{field}`"
            return f"field `{field}`: {first['msg']}, got {_json_type(first['input'])}"
        nul = _nul_in(checked)
        if nul is not None:  # file names, argv, env: every OS call would refuse it, far away
            return f"field `{nul}`: a NUL byte in a string"
        return checked


def _nul_in(value: object, where: str = "") -> str | None:
    """Where in a request a string holds a NUL byte (`field.key.0`), or None."""
    if isinstance(value, str):
        return where if "\0" in value else None
    if isinstance(value, dict):
        if any("\0" in str(k) for k in value):  # a key (an environment variable's name)
            return f"{where} (a key)"
        items: list[tuple[str, object]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return None
    for key, v in items:
        found = _nul_in(v, f"{where}.{key}" if where else key)
        if found is not None:
            return found
    return None


class ApiServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        """`handlers`: each op's, checked against its request (api.REQUESTS) here."""
        self.path = path
        self.routes = {op: Route.of(op, fn, REQUESTS[op]) for op, fn in handlers.items()}
        claim_socket_path(path)
        server = self

        class _Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server._serve(self)

        self._server = socketserver.ThreadingUnixStreamServer(str(path), _Conn)
        self._server.daemon_threads = True
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self, conn: socketserver.StreamRequestHandler) -> None:
        sock: socket.socket = conn.request
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            self._reply(
                conn,
                {
                    "ok": False,
                    "kind": ErrorKind.PERMISSION,
                    "error": "only root may use the checkpointer daemon",
                },
            )
            return
        try:
            line = _read_request_line(sock)
        except _RequestTooLarge:
            self._reply(
                conn, _protocol_error(f"request too large (over {MAX_REQUEST_BYTES >> 20} MiB)")
            )
            return
        except TimeoutError:
            self._reply(
                conn, _protocol_error(f"no complete request within {REQUEST_READ_TIMEOUT:g} s")
            )
            return
        except OSError:
            return  # the client went away
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
            self._reply(conn, _protocol_error("malformed request: not a line of JSON"))
            return
        problem = _request_problem(req)
        if problem:
            self._reply(conn, _protocol_error(f"malformed request: {problem}"))
            return
        op, args = req["op"], req.get("args", {})
        route = self.routes.get(op)
        if route is None:
            self._reply(conn, _protocol_error(f"unknown op {op!r}"))
            return
        checked = route.check(args)
        if isinstance(checked, str):
            self._reply(conn, _protocol_error(f"bad arguments for op {op!r}: {checked}"))
            return
        args = checked
        if req.get("progress") and route.takes_progress:
            last = [0.0]

            def progress(done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] >= 0.1 or done >= total:
                    last[0] = now
                    self._reply(conn, {"progress": [done, total]})

            args = {**args, "progress": progress}
        try:
            result = route.handler(**args)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except CheckpointerError as e:
            reply = {"ok": False, "kind": e.kind, "error": str(e)}
        except StorageError as e:
            reply = {"ok": False, "kind": ErrorKind.STORAGE, "error": str(e)}
        except ValueError as e:
            reply = {"ok": False, "kind": ErrorKind.INVALID, "error": str(e)}
        except Exception as e:
            log.exception("request %s failed", op)
            reply = {
                "ok": False,
                "kind": ErrorKind.INTERNAL,
                "error": f"internal error in the daemon ({type(e).__name__}: {e}); "
                "its log has the details",
            }
        self._reply(conn, reply)

    @staticmethod
    def _reply(conn: socketserver.StreamRequestHandler, reply: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.wfile.write(json.dumps(reply, default=str).encode() + b"\n")


MAX_REQUEST_BYTES = 1 << 20
"""The longest request line the server reads (requests are small: an op and its arguments)."""
REQUEST_READ_TIMEOUT = 10.0
"""Seconds a client has to send its whole request line; replies may then take as long as the
operation does (a checkpoint streams progress)."""


class _RequestTooLarge(Exception):
    pass


def _read_request_line(sock: socket.socket) -> bytes:
    """The request line (up to and without its newline, or what came before EOF), read within
    REQUEST_READ_TIMEOUT in all; one request per connection, so bytes after it are dropped.
    Raises _RequestTooLarge past MAX_REQUEST_BYTES, TimeoutError past the deadline."""
    deadline = time.monotonic() + REQUEST_READ_TIMEOUT
    buf = bytearray()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            end = chunk.find(b"\n")
            if end >= 0:
                buf += chunk[:end]
                break
            buf += chunk
            if len(buf) > MAX_REQUEST_BYTES:
                raise _RequestTooLarge
    finally:
        sock.settimeout(None)
    if len(buf) > MAX_REQUEST_BYTES:
        raise _RequestTooLarge
    return bytes(buf)


def _request_problem(req: Any) -> str:
    """What is wrong with a decoded request, or "" when it is an object with a str `op` and,
    if given, a dict `args`."""
    if not isinstance(req, dict):
        return f"expected a JSON object, got {_json_type(req)}"
    if "op" not in req:
        return "no `op`"
    if not isinstance(req["op"], str):
        return f"`op` must be a string, got {_json_type(req['op'])}"
    if not isinstance(req.get("args", {}), dict):
        return f"`args` must be an object, got {_json_type(req['args'])}"
    return ""


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _protocol_error(message: str) -> dict[str, Any]:
    return {"ok": False, "kind": ErrorKind.PROTOCOL, "error": message}


def claim_socket_path(path: Path) -> None:
    """Refuse to start beside a live daemon; remove a stale socket left by a dead one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):  # never removed: it may be anyone's file or folder
        raise ConfigError(
            f"socket: {path} exists and is not a socket; remove it, or set `socket` (or "
            "`state_dir`) to a path of its own"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise CheckpointerError(
        f"another checkpointer daemon is already serving {path}; "
        "stop it first, or give this one another state_dir"
    )
