"""The restore policy, in one place: what to do when a workload's tree dies (`on_death`), which
checkpoints to try (`plan`), how long to wait (`backoff`, `retry_later`), and whose fault a
failed restore was (`fault_of`), which decides whether its checkpoint is marked bad.

Pure logic, no processes. The supervisor (checkpointer/daemon/supervisor.py) schedules; the
engine's Recovery feeds the policy the facts and carries out its decision under the
workload's lock (plan, then execute).

- A death long after the last restore (more than `crash_window`) starts a new streak: restore
  the newest good checkpoint at once.
- A death within `crash_window` of a restore is a crash loop: the newest checkpoint may hold
  the state that crashes, so step back one older checkpoint each time, waiting exponentially
  longer (`backoff_initial` doubling up to `backoff_max`). The checkpoint that crashed is
  remembered for the streak: a manual restore does not pick it unless named.
- A restore that failed for a reason outside the checkpoint (storage down, a PID or port
  taken) is tried again, with the same back-off, without limit (`retry_later`).
- Past `max_depth` checkpoints, a managed workload is cold-started from its command (if
  `cold_start`); after `max_attempts` attempts in one streak, the workload is marked failed.

The policy's settings are config (`checkpointer.config.RestorePolicy`); this module decides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from checkpointer.config import RestorePolicy
from checkpointer.criu import CriuError
from checkpointer.criu.failure_category import CriuFailure
from checkpointer.errors import RestoreFailed, TeardownFailed
from storage import StorageError
from storage.errors import StorageAccessError, TransientStorageError


@dataclass(frozen=True)
class Streak:
    """A workload's run of deaths and restores, as the engine persists it."""

    attempts: int = 0  # restore attempts in this streak
    depth: int = 0  # how many good checkpoints to step back from the newest
    last_restore_at: float | None = None
    retries: int = 0  # the same restore tried again after failures outside the checkpoint
    crash_looped: tuple[str, ...] = ()  # checkpoints that died within crash_window of restore

    def __post_init__(self) -> None:
        # The registry stores the streak as JSON, where a tuple comes back as a list.
        object.__setattr__(self, "crash_looped", tuple(self.crash_looped))


class Action(StrEnum):
    """What the policy decided about a tree that died."""

    RESTORE = "restore"
    """Restore it after `Decision.delay` seconds (state `restoring` until then)."""
    GIVE_UP = "give_up"
    """Too many attempts in one crash loop: the workload is marked failed."""
    IGNORE = "ignore"
    """Leave it down: it exited cleanly, or automatic restore is off."""


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float
    streak: Streak
    why: str


# 2.0**1023 is the largest power of two a float holds: `backoff_initial * 2**1024` raises
# OverflowError (which once killed the supervisor's retry timer after 1024 attempts), and
# long before that exponent every wait is `backoff_max` anyway.
_MAX_DOUBLINGS = 1023

# Checkpoints remembered as crash-looped per streak: a streak ends at max_attempts, which a
# config may set high; the newest are the ones a manual restore would otherwise pick.
_CRASH_LOOPED_KEPT = 100


def backoff(policy: RestorePolicy, n: int) -> float:
    """The wait before attempt n + 2 of a loop or of a retry: `backoff_initial` doubled `n`
    times, at most `backoff_max`. The one back-off formula: crash loops and retries alike."""
    return min(policy.backoff_max, policy.backoff_initial * 2.0 ** min(n, _MAX_DOUBLINGS))


def retry_later(policy: RestorePolicy, streak: Streak) -> tuple[Streak, float]:
    """A restore failed for a reason outside the checkpoint: the streak with one more retry,
    and how long to wait before the same restore is tried again. No limit: giving up would
    lose the state the checkpoints hold."""
    return replace(streak, retries=streak.retries + 1), backoff(policy, streak.retries)


def on_death(
    policy: RestorePolicy,
    streak: Streak,
    now: float,
    clean_exit: bool,
    restored_from: str | None = None,
) -> Decision:
    """`restored_from`: the checkpoint the tree was last restored from (None: a cold start, or
    unknown); remembered as crash-looped if the tree died within crash_window of it."""
    if clean_exit and not policy.on_clean_exit:
        return Decision(Action.IGNORE, 0.0, Streak(), "exited cleanly: finished, not restored")
    if not policy.on_crash:
        return Decision(Action.IGNORE, 0.0, streak, "automatic restore is off (restore.on_crash)")
    looping = streak.last_restore_at is not None and now - streak.last_restore_at < (
        policy.crash_window
    )
    if looping:
        looped = streak.crash_looped
        if restored_from is not None and restored_from not in looped:
            looped = (*looped, restored_from)[-_CRASH_LOOPED_KEPT:]
        nxt = Streak(
            streak.attempts + 1, streak.depth + 1, streak.last_restore_at, crash_looped=looped
        )
        delay = backoff(policy, streak.depth)
        why = (
            f"died {now - (streak.last_restore_at or now):.1f}s after its last restore "
            f"(crash loop): stepping back to checkpoint #{nxt.depth + 1} from the newest"
        )
    else:
        nxt = Streak(1, 0, streak.last_restore_at)
        delay = 0.0
        why = "died: restoring the newest good checkpoint"
    if nxt.attempts > policy.max_attempts:
        return Decision(
            Action.GIVE_UP,
            0.0,
            nxt,
            f"gave up after {policy.max_attempts} restore attempts in a crash loop",
        )
    return Decision(Action.RESTORE, delay, nxt, why)


@dataclass(frozen=True)
class Plan:
    """Which checkpoints to try, in order, then whether a cold start is allowed."""

    checkpoints: list[str]
    cold_start: bool


def plan(policy: RestorePolicy, good_newest_first: list[str], depth: int, managed: bool) -> Plan:
    """The good checkpoints within `max_depth`, from `depth` back (a crash loop steps back
    one per death), then a cold start if the workload is managed and the policy allows it."""
    window = good_newest_first[: policy.max_depth]
    return Plan(window[depth:], managed and policy.cold_start)


def storage_unavailable(e: BaseException) -> bool:
    """Whether a failure to read a checkpoint says the storage (or the local disk) failed,
    not the checkpoint (damaged data, a pack gone): one rule for full and lazy restores."""
    if isinstance(e, TransientStorageError | StorageAccessError):
        return True
    return isinstance(e, OSError) and not isinstance(e, StorageError) and bool(e.errno)


def is_transient(e: BaseException) -> bool:
    """A restore that failed this way should be tried again later, not marked bad."""
    if isinstance(e, RestoreFailed):
        return e.transient
    if isinstance(e, CriuError):
        # Caused by the host, not the image (CriuFailure.host_caused): the same checkpoint may
        # well restore once the PID or port is free again. A category that is no member (a
        # string from elsewhere) is the image's.
        try:
            return CriuFailure(e.category).host_caused
        except ValueError:
            return False
    return False


class Fault(StrEnum):
    """Whose fault a failed restore (or listing of checkpoints to restore) was: what becomes
    of the checkpoint, and what the policy does next."""

    CHECKPOINT = "checkpoint"
    """Its own (damaged data, an image CRIU refuses, anything unforeseen): it is marked bad
    and the one before it is tried."""
    OUTSIDE = "outside"
    """The host's or the storage's (a PID or port taken, the bucket down): the checkpoint
    stays good and the same restore is tried again later, with the back-off, without limit
    (marking every checkpoint bad through an outage would lose the state they hold)."""
    TREE = "tree"
    """The running tree would not stop (a rollback's TeardownFailed): nothing was restored,
    the checkpoint is not at fault."""


def fault_of(e: BaseException) -> Fault:
    """The one rule for full, lazy and rolled-back restores alike (see `Fault`)."""
    if isinstance(e, TeardownFailed):
        return Fault.TREE
    if is_transient(e) or isinstance(e, TransientStorageError | StorageAccessError):
        return Fault.OUTSIDE
    return Fault.CHECKPOINT
