"""What to do when a workload's tree dies: which checkpoint to restore, when, or to give up.

Pure logic, no processes: the engine feeds it the facts and carries out its decision.

- A death long after the last restore (more than `crash_window`) starts a new streak: restore
  the newest good checkpoint at once.
- A death within `crash_window` of a restore is a crash loop: the newest checkpoint may hold
  the state that crashes, so step back one older checkpoint each time, waiting exponentially
  longer (`backoff_initial` doubling up to `backoff_max`).
- Past `max_depth` checkpoints, a managed workload is cold-started from its command (if
  `cold_start`); after `max_attempts` attempts in one streak, the workload is marked failed.

The policy's settings are config (`checkpointer.config.RestorePolicy`); this module decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from checkpointer.config import RestorePolicy


@dataclass(frozen=True)
class Streak:
    """A workload's run of deaths and restores, as the engine persists it."""

    attempts: int = 0  # restore attempts in this streak
    depth: int = 0  # how many good checkpoints to step back from the newest
    last_restore_at: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Literal["restore", "give_up", "ignore"]
    delay: float
    streak: Streak
    why: str


def on_death(policy: RestorePolicy, streak: Streak, now: float, clean_exit: bool) -> Decision:
    if clean_exit and not policy.on_clean_exit:
        return Decision("ignore", 0.0, Streak(), "exited cleanly: finished, not restored")
    if not policy.on_crash:
        return Decision("ignore", 0.0, streak, "automatic restore is off (restore.on_crash)")
    looping = streak.last_restore_at is not None and now - streak.last_restore_at < (
        policy.crash_window
    )
    if looping:
        nxt = Streak(streak.attempts + 1, streak.depth + 1, streak.last_restore_at)
        delay = min(policy.backoff_initial * 2 ** (streak.depth), policy.backoff_max)
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
            "give_up",
            0.0,
            nxt,
            f"gave up after {policy.max_attempts} restore attempts in a crash loop",
        )
    return Decision("restore", delay, nxt, why)


@dataclass(frozen=True)
class Plan:
    """Which checkpoints to try, in order, then whether a cold start is allowed."""

    checkpoints: list[str]
    cold_start: bool


def plan(policy: RestorePolicy, good_newest_first: list[str], depth: int, managed: bool) -> Plan:
    window = good_newest_first[: policy.max_depth]
    return Plan(window[depth:], managed and policy.cold_start)
