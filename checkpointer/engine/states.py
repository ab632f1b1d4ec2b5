"""The named values the daemon reports and clients branch on, documented member by member:
a workload's kind and state, why a restore ran and how it ended, where its image came from,
how a drill ended, what retention does with a checkpoint, and the kind of an error. Only
enums, no imports of the engine: the API (checkpointer/api.py) re-exports them, and the CLI
reads them without loading the engine. Why CRIU failed (`CriuFailure`) is defined in
criu/failure_category.py, which may not import the engine, and re-exported here with the others.

Each is a StrEnum: its members are the strings the JSON carries and workloads.json keeps.
"""

from __future__ import annotations

from enum import StrEnum

from checkpointer.criu.failure_category import CriuFailure as CriuFailure


class WorkloadKind(StrEnum):
    """How the daemon came to watch a workload, which says how it stops and restores it."""

    MANAGED = "managed"
    """Started by the daemon as PID 1 of its own PID namespace: restores never compete for
    host PIDs, and a cold start can run its command again."""
    ADOPTED = "adopted"
    """Started elsewhere and registered by PID: a restore needs its old PIDs free."""
    LXC = "lxc"
    """An LXC container, checkpointed and restored by `lxc-checkpoint`."""
    PODMAN = "podman"
    """A Podman container (runtime runc), checkpointed and restored by Podman."""

    @property
    def is_container(self) -> bool:
        return self in (WorkloadKind.LXC, WorkloadKind.PODMAN)


class WorkloadState(StrEnum):
    """What the daemon knows of a workload's tree (`status`)."""

    RUNNING = "running"
    """Its tree runs (as far as the daemon knows: `status` says `gone` if it vanished)."""
    STOPPING = "stopping"
    """The daemon is tearing it down: its death is expected and not restored."""
    STOPPED = "stopped"
    """Stopped by the daemon (unregister, rollback, shutdown of a demo)."""
    EXITED = "exited"
    """The tree exited with status 0: finished, not restored unless `on_clean_exit`."""
    CRASHED = "crashed"
    """The tree died (signal, non-zero exit, or gone at boot): the policy decides."""
    RESTORING = "restoring"
    """An automatic restore is scheduled or running."""
    FAILED = "failed"
    """The policy gave up; nothing happens until `checkpointer restore`."""
    GONE = "gone"
    """Reported only: recorded as running, but its process no longer exists."""
    ELSEWHERE = "elsewhere"
    """Another host of the fleet owns it (migrated away, taken over while this host was
    away, or found owned elsewhere at boot): this host neither runs nor restores it."""


class RestoreReason(StrEnum):
    """Why a restore ran: the `reason` label of the restore metrics, and of each restore in
    `status` (a workload's history)."""

    CRASH = "crash"
    """The tree died (or was found gone when the daemon started): the restore policy."""
    BOOT = "boot"
    """The host rebooted, or a declared workload was found stopped with the daemon."""
    ROLLBACK = "rollback"
    """`checkpointer rollback`, or the policy after a rollback failed with the tree stopped."""
    MANUAL = "manual"
    """`checkpointer restore`."""
    MIGRATION = "migration"
    """Handed to this host by `checkpointer migrate` (or a drain) on another host."""
    FAILOVER = "failover"
    """Taken over from a host whose lease expired."""
    LAZY = "lazy"
    """In the history only: a lazy restore whose pages stopped coming after the tree ran."""


class RestoreResult(StrEnum):
    """How a restore attempt ended (each attempt in `status`, newest last)."""

    OK = "ok"
    """The tree runs again (or was cold-started, when no checkpoint was left)."""
    FAILED = "failed"
    """Failed for a fault of the checkpoint: marked bad; the policy tries the one before."""
    RETRY = "retry"
    """Failed for a reason outside the checkpoint (storage down, a PID in use): the
    checkpoint stays good and the same restore is tried again later."""


class DrillResult(StrEnum):
    """How a restore drill ended (checkpointer/engine/drills.py)."""

    VERIFIED = "verified"
    """CRIU restored every process, file and socket of the checkpoint in the sandbox."""
    FAILED = "failed"
    """It did not, for a fault of the checkpoint: marked bad, restores skip it."""
    ERROR = "error"
    """The drill could not tell (storage down, the sandbox could not be built): nothing marked."""


class ImageSource(StrEnum):
    """Where a restore got the checkpoint's image (`source` in a restore's report)."""

    KEPT = "kept image"
    """The newest image, kept in this host's scratch (tmpfs) since its checkpoint."""
    DISK = "disk image"
    """An image kept on this host's disk (criu.disk_images), checked before use."""
    REPOSITORY = "repository"
    """Rebuilt from the repository (seeded from the kept image where pages match)."""
    LAZY = "repository, lazily (pages on demand)"
    """A lazy restore: the tree ran before its memory was back, pages fetched on demand."""
    LAZY_DISK = "disk image, lazily (pages on demand, each checked)"
    """A lazy restore after a reboot: pages read from the disk image as the tree needs them,
    each checked against the manifest instead of hashing the whole image first."""


class RetentionAction(StrEnum):
    """What retention does with a checkpoint (`prune` and its dry run, one row each)."""

    KEEP = "keep"
    """A rule keeps it (the row's reasons say which: keep_last, keep_daily, pinned, ...)."""
    REMOVE = "remove"
    """No rule keeps it: removed (or would be, in a dry run); its packs go at the next GC."""


class ErrorKind(StrEnum):
    """The `kind` of an error the daemon answers with (checkpointer/errors.py and the API
    server): what scripts branch on; the message says what to do."""

    ERROR = "error"
    """Any other operator error (the base class)."""
    CONFIG = "config"
    """Invalid configuration, workload options or command-line value."""
    UNKNOWN_WORKLOAD = "unknown-workload"
    """No workload of that name here (nor in the repository, where that counts)."""
    WORKLOAD_EXISTS = "workload-exists"
    """A workload of that name, or that container, is registered already."""
    WORKLOAD_RUNNING = "workload-running"
    """A restore of a workload whose tree runs (rollback replaces it)."""
    WORKLOAD_NOT_RUNNING = "workload-not-running"
    """A checkpoint or migration of a workload whose tree is not running."""
    WORKLOAD_BUSY = "workload-busy"
    """Another operation holds the workload: try again when it has finished."""
    NO_SUCH_PROCESS = "no-such-process"
    """No live process has the PID to register."""
    LAUNCH_FAILED = "launch-failed"
    """A managed workload's command could not be started."""
    DAEMON_UNAVAILABLE = "daemon-unavailable"
    """The CLI cannot reach the daemon's socket."""
    CHECKPOINT_FAILED = "checkpoint-failed"
    """A checkpoint was not taken or not stored."""
    RESTORE_FAILED = "restore-failed"
    """A restore failed (the message says whether the checkpoint was marked bad)."""
    TEARDOWN_FAILED = "teardown-failed"
    """Processes of a tree survived SIGKILL (stuck in the kernel)."""
    NOT_OWNER = "not-owner"
    """Another host of the fleet owns the workload."""
    MIGRATION_FAILED = "migration-failed"
    """A migration or drain did not hand the workload over."""
    FLEET_UNAVAILABLE = "fleet-unavailable"
    """Fleet mode cannot run here (no S3, or no conditional writes)."""
    CRIU = "criu"
    """CRIU failed; the message names its failure category and log."""
    CONTAINER = "container"
    """A container runtime (LXC, Podman) refused or failed."""
    DRILL_REFUSED = "drill-refused"
    """A restore drill cannot run here (the sandbox cannot be built)."""
    REGISTRY = "registry"
    """workloads.json cannot be read or written."""
    STORAGE = "storage"
    """The repository or its storage failed (the API server's answer to a StorageError)."""
    INVALID = "invalid"
    """A request's value is out of range (the API server's answer to a ValueError)."""
    INTERNAL = "internal"
    """A bug: the daemon's log has the traceback."""
    PROTOCOL = "protocol"
    """A malformed or unknown request on the socket."""
    PERMISSION = "permission"
    """The caller may not use the daemon's socket."""
