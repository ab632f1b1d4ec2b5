"""Errors an operator sees. Each message says what went wrong and what to do next.

The daemon sends `kind` and `message` to the CLI, which prints one line and exits non-zero;
no traceback ever reaches the operator for these. `kind` is what scripts branch on (the
CLI's `--json` prints it): stable, one per class, each listed and documented in
engine/states.py (ErrorKind). Where the same failure is raised from several places, the
class builds its message (a classmethod, `named`), so that it is written once.
"""

from __future__ import annotations

from checkpointer.engine.states import ErrorKind


class CheckpointerError(Exception):
    """Base of every error with a message meant for the operator."""

    kind: str = ErrorKind.ERROR


class ConfigError(CheckpointerError):
    """The configuration file, a workload's options or a command-line value is invalid; the
    message names the key and what it accepts."""

    kind: str = ErrorKind.CONFIG


class WorkloadNotFound(CheckpointerError):
    """No workload of that name is registered here (and, where that counts, none is known
    to the repository)."""

    kind: str = ErrorKind.UNKNOWN_WORKLOAD

    @classmethod
    def named(cls, name: str, registered: list[str]) -> WorkloadNotFound:
        known = ", ".join(sorted(registered)) or "none"
        return cls(
            f"unknown workload {name!r} (registered: {known}); "
            "see `checkpointer status`, or add it with `checkpointer run`/`register`"
        )


class WorkloadExists(CheckpointerError):
    """A workload of that name (or the same container) is registered already."""

    kind: str = ErrorKind.WORKLOAD_EXISTS

    @classmethod
    def named(cls, name: str) -> WorkloadExists:
        return cls(
            f"workload {name!r} is already registered; pick another name or "
            f"`checkpointer unregister {name}` first"
        )


class WorkloadRunning(CheckpointerError):
    """The operation needs the workload's tree stopped (a restore), and it runs."""

    kind: str = ErrorKind.WORKLOAD_RUNNING

    @classmethod
    def named(cls, name: str, pid: int | None) -> WorkloadRunning:
        return cls(
            f"workload {name} is running (pid {pid}); `checkpointer rollback {name}` "
            "replaces it with a checkpoint, or stop it first"
        )


class WorkloadNotRunning(CheckpointerError):
    """The operation needs the workload's tree running (a checkpoint, a migration, a
    container to register), and it is not."""

    kind: str = ErrorKind.WORKLOAD_NOT_RUNNING


class WorkloadBusy(CheckpointerError):
    """Another operation holds the workload (one at a time per workload): try again later."""

    kind: str = ErrorKind.WORKLOAD_BUSY

    @classmethod
    def named(cls, name: str) -> WorkloadBusy:
        return cls(
            f"workload {name} is busy with another checkpoint, restore or rollback; try again "
            "when it has finished"
        )


class ProcessNotFound(CheckpointerError):
    """No live process has the PID given (or read from the pidfile) to register."""

    kind: str = ErrorKind.NO_SUCH_PROCESS


class LaunchFailed(CheckpointerError):
    """A managed workload's command could not be started (not found, not executable, its
    working directory missing)."""

    kind: str = ErrorKind.LAUNCH_FAILED


class DaemonUnavailable(CheckpointerError):
    """The CLI cannot reach the daemon's socket (not running, or no permission to it)."""

    kind: str = ErrorKind.DAEMON_UNAVAILABLE


class CheckpointFailed(CheckpointerError):
    """A checkpoint was not taken or not stored; the previous ones are untouched."""

    kind: str = ErrorKind.CHECKPOINT_FAILED


class RestoreFailed(CheckpointerError):
    """A restore failed. `transient`: the checkpoint is not at fault (storage unreachable,
    disk full, ...): it stays good and the restore may be tried again."""

    kind: str = ErrorKind.RESTORE_FAILED

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TeardownFailed(CheckpointerError):
    """Processes of a tree survived SIGKILL (stuck in the kernel)."""

    kind: str = ErrorKind.TEARDOWN_FAILED


class NotOwner(CheckpointerError):
    """Another host of the fleet owns the workload (or this host's lease could not be kept)."""

    kind: str = ErrorKind.NOT_OWNER


class MigrationFailed(CheckpointerError):
    """A migration or drain could not start or did not hand the workload over; the message
    says where the tree runs now."""

    kind: str = ErrorKind.MIGRATION_FAILED


class FleetUnavailable(CheckpointerError):
    """Fleet mode cannot run here: no S3, or a store that does not enforce conditional writes."""

    kind: str = ErrorKind.FLEET_UNAVAILABLE
