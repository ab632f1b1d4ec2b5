"""Why a CRIU operation failed, as the one enum every producer names (criu/failures.py's
log classifier, the driver, the lazy restore, the drill's sandbox, the container runtimes,
workloads/users.py's check before a dump) and policy branches on.

A module of its own that imports nothing: criu/ may not import the engine, and
engine/states.py (imported by errors.py) re-exports it beside the other named values, so it
cannot import errors.py's CriuError either.
"""

from __future__ import annotations

from enum import StrEnum


class CriuFailure(StrEnum):
    """Why a CRIU operation (or a container runtime's checkpoint or restore) failed.

    A StrEnum: its members equal the strings logs, metrics labels and tests carry. "Retried"
    says what the restore policy does when a restore fails this way (`host_caused`): the
    host's fault, so the checkpoint stays good and the same restore is tried again with the
    back-off; every other category marks the checkpoint bad and the one before it is tried.
    """

    # From CRIU's log (`classify`).
    GHOST_FILE_TOO_LARGE = "ghost-file-too-large"
    """A process holds open a deleted file over CRIU's ghost limit (a dump). Not retried."""
    UNLINKED_FILE = "unlinked-file"
    """A process holds open a file deleted under the name it was opened by (a dump). Not
    retried."""
    PID_IN_USE = "pid-in-use"
    """Another process holds a PID the checkpoint needs. Retried: the PID may be freed."""
    FILE_CHANGED = "file-changed"
    """A file the process had open changed since the checkpoint (CRIU saves no file
    contents). Not retried: the checkpoint is marked bad."""
    TCP_ESTABLISHED = "tcp-established"
    """Established TCP connections without criu.tcp_established. Not retried."""
    EXTERNAL_UNIX_SOCKET = "external-unix-socket"
    """A unix socket connected outside the tree without criu.ext_unix_sk. Not retried."""
    FILE_LOCKS = "file-locks"
    """File locks held without criu.file_locks. Not retried."""
    TTY = "tty"
    """The tree (or container) uses a terminal CRIU cannot save or restore. Not retried."""
    ADDRESS_IN_USE = "address-in-use"
    """A socket address the checkpoint listens on is taken. Retried: it may be freed."""
    CRIU_TOO_OLD = "criu-too-old"
    """This CRIU does not support the kernel (or is older than 4.2). Retried: the host's
    fault, an upgraded CRIU restores the same checkpoint."""
    PROCESS_GONE = "process-gone"
    """The process died under CRIU (a dump: the checkpoint pipeline waits a moment for the
    death to be seen). Not retried."""
    PROC_DIR_EXISTS = "proc-dir-exists"
    """CRIU's proc.crtools directory already exists in a process's cwd (a dump: the driver
    removes a stale one and dumps once more). Not retried."""
    SWITCHED_USER = "switched-user"
    """The tree's first process is not root, and CRIU needs it to be (found before the dump
    by workloads/users.py, or in CRIU's log). Not retried."""
    NEEDS_CAP_SYS_RESOURCE = "needs-cap-sys-resource"
    """A process of another user, and the daemon lacks CAP_SYS_RESOURCE (found before the
    dump, or in CRIU's log). Not retried."""
    IN_FLIGHT_CONNECTION = "in-flight-connection"
    """A client's connection sat in a listening socket's accept queue, which CRIU refuses to
    dump (a dump). The host's moment, never the checkpoint's: the driver dumps again a few
    milliseconds later (criu/driver.py), and only a dump that meets it every time fails."""
    PERMISSION = "permission"
    """CRIU was refused an operation: not root, or capabilities missing. Retried."""
    UNKNOWN = "unknown"
    """Nothing in the log names the cause; the advice is to read it. Not retried."""

    # From the driver and the options.
    CRIU_MISSING = "criu-missing"
    """No CRIU binary, or one whose version cannot be read. Retried: the host's fault."""
    TIMEOUT = "timeout"
    """CRIU (or the runtime, or the drill) ran past criu.timeout and was killed. Retried."""
    BAD_OPTION = "bad-option"
    """criu.extra_options holds an option the service does not pass on. Not retried."""

    CPU_MISMATCH = "cpu-mismatch"
    """This host's CPU lacks features the checkpoint's CPU had (criu/cpu/info.py): the
    workload must not move here. Checked before CRIU runs; not retried."""

    # From the lazy restore.
    BAD_IMAGES = "bad-images"
    """The images cannot be prepared for a lazy restore (a damaged page map or pages). Not
    retried."""
    LAZY_GUARD_LOST = "lazy-guard-lost"
    """The lazy restore's guard process died or never started CRIU. Not retried as a category,
    but the lazy restore marks it the host's own fault (`LazyRestore.host_fault`), which
    leaves the checkpoint good."""

    # From the restore drill's sandbox (criu/sandbox/): a drill is not a restore, so the
    # policy never sees these; the drill reports the first three as the sandbox's fault.
    SANDBOX = "sandbox"
    """The drill's sandbox could not be built or did not report."""
    NO_SPACE = "no-space"
    """The sandbox's tmpfs filled up: the host lacks memory."""
    NOT_STOPPED = "not-stopped"
    """Restored processes were not left stopped (CRIU's --leave-stopped)."""
    INCOMPLETE = "incomplete"
    """CRIU restored fewer processes than the checkpoint holds: the checkpoint's fault."""

    # From the container runtimes (containers/).
    BAD_NAME = "bad-name"
    """A container name neither runtime accepts, or unsafe as a path. Not retried."""
    RUNTIME_MISSING = "runtime-missing"
    """The runtime's tool (lxc-checkpoint, podman) is not installed. Retried."""
    IMAGE_MISSING = "image-missing"
    """The container's base image is not on this host. Retried: loading it fixes the
    restore."""
    RUNNING = "running"
    """The container is already running where it should be restored. Retried."""
    CONFIG = "config"
    """The container's configuration stops its checkpoint or restore (LXC config, Podman's
    runtime or attributes). Not retried."""
    APPARMOR = "apparmor"
    """The container's config names an AppArmor profile and this kernel has no AppArmor.
    Not retried."""
    RUNTIME = "runtime"
    """The container's OCI runtime has no checkpoint support (crun without CRIU). Not
    retried."""
    UNSUPPORTED = "unsupported"
    """Podman's export holds something the service does not store (a volume). Not
    retried."""
    ROOTFS = "rootfs"
    """The container's rootfs holds a path too long or a tree too deep to restore. Not
    retried."""
    CORRUPT_IMAGE = "corrupt-image"
    """A container checkpoint that is truncated, malformed or lacks a part. Not retried."""

    @property
    def host_caused(self) -> bool:
        """The host's fault, not the image's: the same checkpoint may well restore once the
        PID or port is free again, CRIU installed, the image loaded (the restore is retried;
        engine/policy.py)."""
        return self in _HOST_CAUSED


_HOST_CAUSED = frozenset(
    {
        CriuFailure.PID_IN_USE,
        CriuFailure.ADDRESS_IN_USE,
        CriuFailure.PERMISSION,
        CriuFailure.IN_FLIGHT_CONNECTION,
        CriuFailure.CRIU_TOO_OLD,
        CriuFailure.CRIU_MISSING,
        CriuFailure.TIMEOUT,
        CriuFailure.IMAGE_MISSING,
        CriuFailure.RUNTIME_MISSING,
        CriuFailure.RUNNING,
    }
)
