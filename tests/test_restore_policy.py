"""The restore policy as pure logic: streaks, step-back, back-off, give-up."""

from __future__ import annotations

import pytest

from checkpointer.criu import CriuError
from checkpointer.engine.checkpoint_spec import CheckpointSpec
from checkpointer.engine.policy import Fault, RestorePolicy, Streak, fault_of, on_death, plan
from checkpointer.errors import RestoreFailed, TeardownFailed
from storage.errors import TransientStorageError

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

P = RestorePolicy(crash_window=60, backoff_initial=1, backoff_max=5, max_depth=3, max_attempts=4)


def test_first_death_restores_newest_at_once() -> None:
    d = on_death(P, Streak(), now=1000, clean_exit=False)
    assert (d.action, d.delay, d.streak.depth, d.streak.attempts) == ("restore", 0, 0, 1)


def test_death_long_after_a_restore_starts_a_new_streak() -> None:
    d = on_death(P, Streak(attempts=3, depth=2, last_restore_at=0), now=1000, clean_exit=False)
    assert (d.action, d.delay, d.streak.depth, d.streak.attempts) == ("restore", 0, 0, 1)


def test_crash_loop_steps_back_with_exponential_backoff_capped() -> None:
    s = Streak(attempts=1, depth=0, last_restore_at=100)
    delays, depths = [], []
    for _ in range(3):
        d = on_death(P, s, now=110, clean_exit=False)
        assert d.action == "restore"
        delays.append(d.delay)
        depths.append(d.streak.depth)
        s = d.streak
    assert delays == [1, 2, 4] and depths == [1, 2, 3]
    d = on_death(P, s, now=110, clean_exit=False)
    assert d.action == "give_up" and "4 restore attempts" in d.why
    big = RestorePolicy(backoff_initial=1, backoff_max=5, max_attempts=50)
    d = on_death(big, Streak(attempts=9, depth=9, last_restore_at=100), now=110, clean_exit=False)
    assert d.delay == 5


def test_clean_exit_and_disabled_restore_are_ignored() -> None:
    assert on_death(P, Streak(), 0, clean_exit=True).action == "ignore"
    assert on_death(RestorePolicy(on_clean_exit=True), Streak(), 0, True).action == "restore"
    assert on_death(RestorePolicy(on_crash=False), Streak(), 0, False).action == "ignore"


def test_plan_window_depth_and_cold_start() -> None:
    ids = ["c5", "c4", "c3", "c2", "c1"]
    assert plan(P, ids, 0, managed=True).checkpoints == ["c5", "c4", "c3"]
    assert plan(P, ids, 2, managed=True).checkpoints == ["c3"]
    p = plan(P, ids, 3, managed=True)
    assert p.checkpoints == [] and p.cold_start
    assert not plan(P, ids, 3, managed=False).cold_start
    assert not plan(RestorePolicy(cold_start=False), [], 0, managed=True).cold_start


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (CriuError("criu restore failed: pid 7 in use", "pid-in-use"), Fault.OUTSIDE),
        (RestoreFailed("bucket unreachable", transient=True), Fault.OUTSIDE),
        (TransientStorageError("503 slow down"), Fault.OUTSIDE),
        (TeardownFailed("pid 9 stuck in D"), Fault.TREE),
        (CriuError("bad image", "unknown"), Fault.CHECKPOINT),
        (RestoreFailed("chunk digest mismatch"), Fault.CHECKPOINT),
        (MemoryError("declared size 8 TiB"), Fault.CHECKPOINT),
    ],
)
def test_whose_fault_a_failed_restore_was_decides_the_checkpoints_fate(
    error: BaseException, fault: Fault
) -> None:
    """One rule for the automatic restore, a rollback and the listing before them: only the
    checkpoint's own faults mark it bad; the host's or the storage's are tried again."""
    assert fault_of(error) is fault


def test_checkpoint_metadata_of_the_wrong_types_reads_as_absent() -> None:
    """A manifest is hostile input: `list` read `dump_stats` by hand and a string there
    raised AttributeError out of the request."""
    hostile = CheckpointSpec.read({"dump_stats": "x", "host": 7, "pid": True, "cpu": []})
    assert hostile == CheckpointSpec()
    assert hostile.frozen_seconds is None and hostile.cpu_info() is None
    assert CheckpointSpec.read("not a mapping") == CheckpointSpec()
    written = CheckpointSpec(host="web-01", pid=42, dump_stats={"frozen_time": 0.25})
    back = CheckpointSpec.read(written.to_metadata())
    assert back == written and back.frozen_seconds == 0.25
