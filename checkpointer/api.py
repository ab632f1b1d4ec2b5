"""The contract between the daemon and the CLI: operation names and what each returns.

The daemon's handlers return these shapes as JSON; the CLI renders them and `--json` prints
them as they are, so changing a field here is changing the command line's output. The named
values the reports carry as strings (kind, state, result, reason, source, an error's kind,
why CRIU failed) are the enums of checkpointer/engine/states.py, re-exported here with their
documentation.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NotRequired, TypedDict

from checkpointer.criu.images.stats_json import DumpStatsReport as DumpStatsReport
from checkpointer.criu.images.stats_json import RestoreStatsReport as RestoreStatsReport
from checkpointer.engine.states import CriuFailure as CriuFailure
from checkpointer.engine.states import DrillResult as DrillResult
from checkpointer.engine.states import ErrorKind as ErrorKind
from checkpointer.engine.states import ImageSource as ImageSource
from checkpointer.engine.states import RestoreReason as RestoreReason
from checkpointer.engine.states import RestoreResult as RestoreResult
from checkpointer.engine.states import RetentionAction as RetentionAction
from checkpointer.engine.states import WorkloadKind as WorkloadKind
from checkpointer.engine.states import WorkloadState as WorkloadState


class Op(StrEnum):
    RUN = "run"
    REGISTER = "register"
    UNREGISTER = "unregister"
    STATUS = "status"
    CHECKPOINT = "checkpoint"
    LIST = "list"
    RESTORE = "restore"
    ROLLBACK = "rollback"
    PRUNE = "prune"
    VERIFY = "verify"
    PIN = "pin"
    PING = "ping"
    MIGRATE = "migrate"
    HOSTS = "hosts"
    SHUTDOWN_CHECKPOINT = "shutdown-checkpoint"
    DRAIN = "drain"
    DRILL = "drill"


class RestoreAttemptReport(TypedDict):
    time: float
    reason: str
    checkpoint: str | None
    result: str  # ok | failed | retry
    detail: str


class StatusReport(TypedDict):
    name: str
    kind: str
    state: str
    pid: int | None
    exit_status: str | None
    command: list[str] | None
    schedule: str
    last_checkpoint: str | None
    last_checkpoint_age_seconds: float | None
    next_checkpoint: str | None
    last_error: str | None
    failed_reason: str | None
    restores: list[RestoreAttemptReport]
    restore_retries: int  # the same restore tried again after failures outside the checkpoint
    bad_checkpoints: list[str]
    log: str | None
    busy: bool
    owner: str | None  # fleet: the host that holds its lease
    container: str | None  # lxc, podman: the container's name in its runtime
    drill: NotRequired[DrillSummary]  # restore drills (engine/drills.py)


class MigrateReport(TypedDict):
    workload: str
    to: str
    checkpoint: str
    duration_seconds: float
    frozen_at: float  # when the tree was frozen for the final checkpoint (Unix time)


class CpuUnfit(TypedDict):
    """A workload a host's CPU cannot run: what its newest checkpoint needs that the host
    lacks (checkpointer/criu/cpu/fit.py)."""

    workload: str
    checkpoint: str
    missing: list[str]


class HostReport(TypedDict):
    host: str
    last_seen: float
    this_host: bool
    workloads: list[str]
    draining: NotRequired[bool]  # set by engine/drain.py's view of the heartbeats
    cpu_known: NotRequired[bool]  # the host published its CPU (engine/host_cpus.py)
    cannot_take: NotRequired[list[CpuUnfit]]


class FinalCheckpointReport(TypedDict):
    """One workload's outcome at a planned shutdown: `final` (its tree is left stopped at
    that checkpoint), or `kept` (it keeps its last scheduled checkpoint: `why` says why)."""

    workload: str
    result: str  # final | kept
    checkpoint: str | None
    duration_seconds: float
    why: str


class ShutdownReport(TypedDict):
    budget_seconds: float
    duration_seconds: float
    workloads: list[FinalCheckpointReport]


class DrainOutcome(TypedDict):
    workload: str
    to: str | None  # the host it was sent to (None: no host could take it)
    result: str  # moved | stayed
    duration_seconds: float
    why: str  # stayed: why it still runs here


class DrainReport(TypedDict):
    host: str
    duration_seconds: float
    workloads: list[DrainOutcome]


class CheckpointReport(TypedDict):
    workload: str
    id: str
    size_bytes: int
    new_bytes: int
    duration_seconds: float
    dump_stats: DumpStatsReport  # CRIU's, in seconds and pages


class CheckpointEntry(TypedDict):
    id: str
    created: str
    size_bytes: int
    new_bytes: int
    frozen_seconds: float | None
    host: str | None
    local_only: str | None  # the bucket could not be listed: why (only this host's copies)
    mark: str | None  # "bad" or "crash-looped": automatic and unnamed restores skip it
    mark_reason: str | None  # why it was marked
    verified: NotRequired[bool]  # a restore drill restored it (storage/marks.py)


class DrillReport(TypedDict):
    """What a restore drill found (engine/drills.py): `result` verified, failed (the
    checkpoint's fault: marked bad) or error (the drill could not tell: nothing marked)."""

    workload: str
    checkpoint: str
    result: str  # verified | failed | error
    detail: str  # one line: what CRIU restored, or why not
    duration_seconds: float
    marked_bad: bool
    processes: NotRequired[int]  # verified: the processes CRIU restored (all of them)
    restore_stats: NotRequired[RestoreStatsReport]
    rebuild_seconds: NotRequired[float]  # reading the image from the repository, lock held
    sandbox_seconds: NotRequired[float]  # CRIU's restore in the sandbox, lock free


class DrillSummary(TypedDict):
    """The newest drill of a workload and its newest verified checkpoint (`status`)."""

    last_result: str | None
    last_checkpoint: str | None
    last_time: float | None
    last_detail: str | None
    verified_checkpoint: str | None  # the newest still proven (not marked bad since)
    verified_age_seconds: float | None  # how old that checkpoint is
    next_drill: float | None  # drill.every: when the next is due (Unix time)


class RestoreReport(TypedDict):
    workload: str
    checkpoint: str
    pid: int
    reason: str
    duration_seconds: float
    restore_stats: RestoreStatsReport  # zeros where CRIU wrote none
    source: str  # "kept image", "disk image", "repository" or "repository, lazily (...)"
    warning: NotRequired[str]  # a checkpoint marked bad or crash-looped, restored as named


class RetentionRow(TypedDict):
    workload: str
    id: str
    created: str
    action: str  # RetentionAction: keep | remove
    reasons: list[str]


class GcReport(TypedDict):
    deleted_packs: int
    kept_young_unreferenced: int
    referenced_packs: int


class PruneReport(TypedDict):
    dry_run: bool
    checkpoints: list[RetentionRow]
    gc: GcReport


class VerifyReport(TypedDict):
    workload: str
    id: str
    ok: bool
    files: int
    size_bytes: int
    chunks: int
    duration_seconds: float


class PinReport(TypedDict):
    workload: str
    id: str
    pinned: bool


class UnregisterReport(TypedDict):
    workload: str
    stopped: bool


# -- requests: the `args` of each op, checked by the API server before its handler runs ------
# A field the handler's caller may leave out is NotRequired (the handler's default applies);
# a request with a field not listed, or a value of the wrong JSON type, is refused with a
# protocol error naming the field (checkpointer/daemon/api_server.py).


class RunRequest(TypedDict):
    name: str
    command: list[str]
    options: dict[str, Any]  # WorkloadOptions, validated by the daemon (its own messages)
    cwd: NotRequired[str | None]
    env: NotRequired[dict[str, str] | None]


class RegisterRequest(TypedDict):
    name: str
    options: dict[str, Any]
    pid: NotRequired[int | None]
    pidfile: NotRequired[str | None]
    lxc: NotRequired[str | None]  # a container instead of a PID: its name in LXC
    podman: NotRequired[str | None]  # ... or in Podman


class UnregisterRequest(TypedDict):
    name: str
    keep_running: NotRequired[bool]


class StatusRequest(TypedDict):
    name: NotRequired[str | None]  # None: every workload


class CheckpointRequest(TypedDict):
    name: str
    wait: NotRequired[bool]  # wait for another operation on it instead of refusing (busy)


class ListRequest(TypedDict):
    name: str


class RestoreRequest(TypedDict):
    name: str
    checkpoint_id: NotRequired[str | None]  # None: the newest good one
    lazy: NotRequired[bool | None]  # None: the workload's own setting


class RollbackRequest(TypedDict):
    name: str
    to: NotRequired[str | None]
    back: NotRequired[int | None]


class PruneRequest(TypedDict):
    name: NotRequired[str | None]
    dry_run: NotRequired[bool]


class VerifyRequest(TypedDict):
    name: str
    checkpoint_id: NotRequired[str | None]


class PinRequest(TypedDict):
    name: str
    checkpoint_id: str
    unpin: NotRequired[bool]


class NoArgs(TypedDict):
    """`ping` and `hosts` take no arguments."""


class MigrateRequest(TypedDict):
    name: str
    to: str


class ShutdownCheckpointRequest(TypedDict):
    budget: NotRequired[float | None]  # seconds; None: shutdown.budget from the config


class DrainRequest(TypedDict):
    to: NotRequired[str | None]  # None: each workload to the best host for it


class DrillRequest(TypedDict):
    name: str
    checkpoint_id: NotRequired[str | None]


REQUESTS: dict[str, type[Any]] = {
    Op.RUN: RunRequest,
    Op.REGISTER: RegisterRequest,
    Op.UNREGISTER: UnregisterRequest,
    Op.STATUS: StatusRequest,
    Op.CHECKPOINT: CheckpointRequest,
    Op.LIST: ListRequest,
    Op.RESTORE: RestoreRequest,
    Op.ROLLBACK: RollbackRequest,
    Op.PRUNE: PruneRequest,
    Op.VERIFY: VerifyRequest,
    Op.PIN: PinRequest,
    Op.PING: NoArgs,
    Op.MIGRATE: MigrateRequest,
    Op.HOSTS: NoArgs,
    Op.SHUTDOWN_CHECKPOINT: ShutdownCheckpointRequest,
    Op.DRAIN: DrainRequest,
    Op.DRILL: DrillRequest,
}
"""Each op's request (keyed by Op, a str): what the server checks `args` against, a TypedDict
naming the JSON object's fields and their types (the wire format as before)."""
