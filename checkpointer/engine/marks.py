"""The marks on a workload's checkpoints that restores avoid: `bad` (its own fault made a
restore or a restore drill fail) and `crash-looped` (its tree died within crash_window of
being restored from it). `list` shows them; a manual restore skips them unless named.
"""

from __future__ import annotations

from checkpointer.engine.workload import DrillResult, RestoreResult, Workload
from storage import CheckpointNotFound


def marks(w: Workload) -> dict[str, tuple[str, str]]:
    """Checkpoint id -> (mark, why) for the checkpoints of `w` that restores avoid: `bad`
    (failed to restore, or its restore drill failed, for a fault of its own; why: the last
    such failure, while the history holds it) and `crash-looped` (its tree died within
    crash_window of its restore, in the current streak)."""
    out: dict[str, tuple[str, str]] = {}
    for cid in w.streak.crash_looped:
        out[cid] = (
            "crash-looped",
            f"its tree died within {w.restore.crash_window:g}s of being restored from it",
        )
    # The latest failure of each: a restore's, or a restore drill's (engine/drills.py).
    failures = [
        (a.time, a.checkpoint, a.detail)
        for a in w.history
        if a.result is RestoreResult.FAILED and a.checkpoint is not None
    ] + [
        (d.time, d.checkpoint, f"its restore drill failed: {d.detail}")
        for d in w.drills
        if d.result is DrillResult.FAILED
    ]
    failed = {cid: why for _, cid, why in sorted(failures, key=lambda f: f[0])}
    for cid in w.bad_checkpoints:
        out[cid] = ("bad", failed.get(cid, "its failed restore is no longer in the history"))
    return out


def newest_unmarked(w: Workload, newest_first: list[str]) -> str:
    """What a manual restore takes when no checkpoint is named: the newest that is neither
    marked bad nor crash-looped (the alert for a failed workload tells the operator to run
    `restore NAME`: it must not bring back the state that crashed)."""
    marked = marks(w)
    for cid in newest_first:
        if cid not in marked:
            return cid
    raise CheckpointNotFound(
        f"every checkpoint of {w.name} is marked bad or crash-looped (`checkpointer list "
        f"{w.name}` says why); name one to restore it anyway: `checkpointer restore {w.name} "
        "--checkpoint ID`"
    )


def restored_from(w: Workload) -> str | None:
    """The checkpoint the workload's tree was last restored from, per its history (None: it
    was cold-started, or its history holds no restore)."""
    for attempt in reversed(w.history):
        if attempt.result is RestoreResult.OK:
            return attempt.checkpoint
    return None
