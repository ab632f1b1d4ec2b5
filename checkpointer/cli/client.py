"""The daemon's client: one JSON request out, progress lines and one JSON answer back, over
the root-only Unix socket the daemon serves (see checkpointer.daemon.api_server)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from checkpointer.api import (
    CheckpointEntry,
    CheckpointReport,
    HostReport,
    MigrateReport,
    Op,
    PinReport,
    PruneReport,
    RestoreReport,
    StatusReport,
    UnregisterReport,
    VerifyReport,
)
from checkpointer.errors import CheckpointerError, DaemonUnavailable

ProgressCallback = Callable[[int, int], None]


class RemoteError(CheckpointerError):
    """An error the daemon reported; `kind` is the daemon-side error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def call(path: Path, op: Op, on_progress: ProgressCallback | None = None, **args: Any) -> Any:
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
        req: dict[str, Any] = {"op": str(op), "args": args}
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


class Client:
    """The daemon's operations with their arguments and the report each returns (checkpointer.api).

    The reports are what the daemon sent, typed as the contract says; nothing is re-validated.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(
        self,
        name: str,
        command: list[str],
        options: dict[str, Any],
        env: dict[str, str],
        cwd: str,
    ) -> StatusReport:
        result = call(
            self.path, Op.RUN, name=name, command=command, options=options, env=env, cwd=cwd
        )
        return cast(StatusReport, result)

    def register(
        self,
        name: str,
        pid: int | None,
        pidfile: str | None,
        options: dict[str, Any],
        lxc: str | None = None,
        podman: str | None = None,
    ) -> StatusReport:
        result = call(
            self.path,
            Op.REGISTER,
            name=name,
            pid=pid,
            pidfile=pidfile,
            options=options,
            lxc=lxc,
            podman=podman,
        )
        return cast(StatusReport, result)

    def unregister(self, name: str, keep_running: bool) -> UnregisterReport:
        result = call(self.path, Op.UNREGISTER, name=name, keep_running=keep_running)
        return cast(UnregisterReport, result)

    def status(self, name: str | None) -> list[StatusReport]:
        return cast(list[StatusReport], call(self.path, Op.STATUS, name=name))

    def checkpoint(self, name: str) -> CheckpointReport:
        return cast(CheckpointReport, call(self.path, Op.CHECKPOINT, name=name))

    def checkpoints(self, name: str) -> list[CheckpointEntry]:
        return cast(list[CheckpointEntry], call(self.path, Op.LIST, name=name))

    def restore(
        self,
        name: str,
        checkpoint_id: str | None,
        on_progress: ProgressCallback | None = None,
        lazy: bool | None = None,
    ) -> RestoreReport:
        result = call(
            self.path,
            Op.RESTORE,
            on_progress=on_progress,
            name=name,
            checkpoint_id=checkpoint_id,
            lazy=lazy,
        )
        return cast(RestoreReport, result)

    def rollback(self, name: str, to: str | None, back: int | None) -> RestoreReport:
        return cast(RestoreReport, call(self.path, Op.ROLLBACK, name=name, to=to, back=back))

    def prune(self, name: str | None, dry_run: bool) -> PruneReport:
        return cast(PruneReport, call(self.path, Op.PRUNE, name=name, dry_run=dry_run))

    def verify(
        self, name: str, checkpoint_id: str | None, on_progress: ProgressCallback | None = None
    ) -> VerifyReport:
        result = call(
            self.path, Op.VERIFY, on_progress=on_progress, name=name, checkpoint_id=checkpoint_id
        )
        return cast(VerifyReport, result)

    def pin(self, name: str, checkpoint_id: str, unpin: bool) -> PinReport:
        result = call(self.path, Op.PIN, name=name, checkpoint_id=checkpoint_id, unpin=unpin)
        return cast(PinReport, result)

    def migrate(self, name: str, to: str) -> MigrateReport:
        return cast(MigrateReport, call(self.path, Op.MIGRATE, name=name, to=to))

    def hosts(self) -> list[HostReport]:
        return cast(list[HostReport], call(self.path, Op.HOSTS))
