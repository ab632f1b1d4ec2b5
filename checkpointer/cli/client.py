"""The daemon's client: one JSON request out, progress lines and one JSON answer back, over
the root-only Unix socket the daemon serves (see checkpointer.daemon.api_server)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkpointer.errors import CheckpointerError, DaemonUnavailable


class RemoteError(CheckpointerError):
    """An error the daemon reported; `kind` is the daemon-side error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def call(
    path: Path, op: str, on_progress: Callable[[int, int], None] | None = None, **args: Any
) -> Any:
    """Send one request to the daemon and return its result, or raise RemoteError.

    With `on_progress`, the daemon streams (done, total) byte counts before its answer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reply: dict[str, Any] | None = None
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(
                f"the checkpointer daemon is not running (no daemon at {path}); start it with "
                "`checkpointer daemon --config FILE` (or `systemctl start checkpointer`)"
            ) from e
        except PermissionError as e:
            raise DaemonUnavailable(f"permission denied on {path}: run as root") from e
        req: dict[str, Any] = {"op": op, "args": args}
        if on_progress:
            req["progress"] = True
        sock.sendall(json.dumps(req).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                msg = json.loads(line)
                if "progress" in msg:
                    if on_progress:
                        on_progress(*msg["progress"])
                    continue
                reply = msg
                break
    finally:
        sock.close()
    if reply is None:
        raise DaemonUnavailable("the daemon closed the connection without answering; check its log")
    if not reply.get("ok"):
        raise RemoteError(reply.get("kind", "error"), reply.get("error", "unknown error"))
    return reply.get("result")
