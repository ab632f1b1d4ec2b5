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
    CheckpointRequest,
    HostReport,
    ListRequest,
    MigrateReport,
    MigrateRequest,
    Op,
    PinReport,
    PinRequest,
    PruneReport,
    PruneRequest,
    RegisterRequest,
    RestoreReport,
    RestoreRequest,
    RollbackRequest,
    RunRequest,
    StatusReport,
    StatusRequest,
    UnregisterReport,
    UnregisterRequest,
    VerifyReport,
    VerifyRequest,
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

    Each request is built as its api.*Request (mypy checks it against the contract the
    daemon's server enforces); the reports are what the daemon sent, typed as the contract
    says; nothing is re-validated.
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
        request: RunRequest = {
            "name": name,
            "command": command,
            "options": options,
            "env": env,
            "cwd": cwd,
        }
        return cast(StatusReport, call(self.path, Op.RUN, **request))

    def register(
        self,
        name: str,
        pid: int | None,
        pidfile: str | None,
        options: dict[str, Any],
        lxc: str | None = None,
        podman: str | None = None,
    ) -> StatusReport:
        request: RegisterRequest = {
            "name": name,
            "pid": pid,
            "pidfile": pidfile,
            "options": options,
            "lxc": lxc,
            "podman": podman,
        }
        return cast(StatusReport, call(self.path, Op.REGISTER, **request))

    def unregister(self, name: str, keep_running: bool) -> UnregisterReport:
        request: UnregisterRequest = {"name": name, "keep_running": keep_running}
        return cast(UnregisterReport, call(self.path, Op.UNREGISTER, **request))

    def status(self, name: str | None) -> list[StatusReport]:
        request: StatusRequest = {"name": name}
        return cast(list[StatusReport], call(self.path, Op.STATUS, **request))

    def checkpoint(self, name: str) -> CheckpointReport:
        request: CheckpointRequest = {"name": name}
        return cast(CheckpointReport, call(self.path, Op.CHECKPOINT, **request))

    def checkpoints(self, name: str) -> list[CheckpointEntry]:
        request: ListRequest = {"name": name}
        return cast(list[CheckpointEntry], call(self.path, Op.LIST, **request))

    def restore(
        self,
        name: str,
        checkpoint_id: str | None,
        on_progress: ProgressCallback | None = None,
        lazy: bool | None = None,
    ) -> RestoreReport:
        request: RestoreRequest = {"name": name, "checkpoint_id": checkpoint_id, "lazy": lazy}
        return cast(RestoreReport, call(self.path, Op.RESTORE, on_progress, **request))

    def rollback(self, name: str, to: str | None, back: int | None) -> RestoreReport:
        request: RollbackRequest = {"name": name, "to": to, "back": back}
        return cast(RestoreReport, call(self.path, Op.ROLLBACK, **request))

    def prune(self, name: str | None, dry_run: bool) -> PruneReport:
        request: PruneRequest = {"name": name, "dry_run": dry_run}
        return cast(PruneReport, call(self.path, Op.PRUNE, **request))

    def verify(
        self, name: str, checkpoint_id: str | None, on_progress: ProgressCallback | None = None
    ) -> VerifyReport:
        request: VerifyRequest = {"name": name, "checkpoint_id": checkpoint_id}
        return cast(VerifyReport, call(self.path, Op.VERIFY, on_progress, **request))

    def pin(self, name: str, checkpoint_id: str, unpin: bool) -> PinReport:
        request: PinRequest = {"name": name, "checkpoint_id": checkpoint_id, "unpin": unpin}
        return cast(PinReport, call(self.path, Op.PIN, **request))

    def migrate(self, name: str, to: str) -> MigrateReport:
        request: MigrateRequest = {"name": name, "to": to}
        return cast(MigrateReport, call(self.path, Op.MIGRATE, **request))

    def hosts(self) -> list[HostReport]:
        return cast(list[HostReport], call(self.path, Op.HOSTS))
