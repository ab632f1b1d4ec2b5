"""Errors an operator sees. Each message says what went wrong and what to do next.

The daemon sends `kind` and `message` to the CLI, which prints one line and exits non-zero;
no traceback ever reaches the operator for these.
"""

from __future__ import annotations


class CheckpointerError(Exception):
    """Base of every error with a message meant for the operator."""

    kind = "error"


class ConfigError(CheckpointerError):
    kind = "config"


class WorkloadNotFound(CheckpointerError):
    kind = "unknown-workload"


class WorkloadExists(CheckpointerError):
    kind = "workload-exists"


class WorkloadRunning(CheckpointerError):
    kind = "workload-running"


class WorkloadNotRunning(CheckpointerError):
    kind = "workload-not-running"


class WorkloadBusy(CheckpointerError):
    kind = "workload-busy"


class ProcessNotFound(CheckpointerError):
    kind = "no-such-process"


class LaunchFailed(CheckpointerError):
    kind = "launch-failed"


class DaemonUnavailable(CheckpointerError):
    kind = "daemon-unavailable"


class CheckpointFailed(CheckpointerError):
    kind = "checkpoint-failed"


class RestoreFailed(CheckpointerError):
    """`transient`: the checkpoint is not at fault (storage unreachable, disk full, ...)."""

    kind = "restore-failed"

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TeardownFailed(CheckpointerError):
    """Processes of a tree survived SIGKILL (stuck in the kernel)."""

    kind = "teardown-failed"


class NotOwner(CheckpointerError):
    """Another host of the fleet owns the workload (or this host's lease could not be kept)."""

    kind = "not-owner"


class MigrationFailed(CheckpointerError):
    kind = "migration-failed"


class FleetUnavailable(CheckpointerError):
    """Fleet mode cannot run here: no S3, or a store that does not enforce conditional writes."""

    kind = "fleet-unavailable"
