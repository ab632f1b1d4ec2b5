"""Retention grammar (restic `forget` semantics) with fixed clocks, table-driven."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from checkpointer.config import Retention as RetentionPolicy
from storage.retention import Item, decide

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # a Monday


def items(*offsets: timedelta, size: int = 100) -> list[Item]:
    """Checkpoints at T0 - offset, named by their offset in hours for readable tables."""
    return [Item(f"h{o.total_seconds() / 3600:g}", T0 - o, size) for o in offsets]


H = timedelta(hours=1)
D = timedelta(days=1)
HOURLY = items(*(i * 0.5 * H for i in range(10)))  # every 30 min over 4.5 h
DAILY = items(*(i * 6 * H for i in range(20)))  # every 6 h over ~5 days
WEEKS = items(*(i * D for i in range(0, 40, 2)))  # every other day over 40 days


@pytest.mark.parametrize(
    ("policy", "given", "kept"),
    [
        (RetentionPolicy(keep_last=3), HOURLY, {"h0", "h0.5", "h1"}),
        # the newest in each of the 3 most recent hours (12:00, 11:xx, 10:xx)
        (RetentionPolicy(keep_hourly=3), HOURLY, {"h0", "h0.5", "h1.5"}),
        # rules are ORed: keep_last 1 and hourly 2 overlap on h0
        (RetentionPolicy(keep_last=1, keep_hourly=2), HOURLY, {"h0", "h0.5"}),
        (RetentionPolicy(keep_last=2, keep_hourly=2), HOURLY, {"h0", "h0.5"}),
        (RetentionPolicy(keep_last=3, keep_hourly=2), HOURLY, {"h0", "h0.5", "h1"}),
        # daily: the newest of each UTC day (12:00, 06:00 is the same day as 12:00)
        (RetentionPolicy(keep_daily=3), DAILY, {"h0", "h18", "h42"}),
        # weekly: ISO weeks, Monday to Sunday; T0 is a Monday at noon
        (RetentionPolicy(keep_weekly=2), WEEKS, {"h0", "h48"}),  # Sat 21 Nov
        (RetentionPolicy(keep_monthly=2), WEEKS, {"h0", "h576"}),  # Fri 30 Oct
        (RetentionPolicy(keep_yearly=5), WEEKS, {"h0"}),
        # within: measured from the newest checkpoint, not from now
        (RetentionPolicy(keep_within=2 * 3600), HOURLY, {"h0", "h0.5", "h1", "h1.5", "h2"}),
        (RetentionPolicy(keep_within=2 * 3600), items(100 * H, 101 * H, 103 * H), {"h100", "h101"}),
        # a bucket with no checkpoint does not count against N
        (RetentionPolicy(keep_daily=2), items(0 * H, 50 * H, 51 * H), {"h0", "h50"}),
        # max_total_bytes removes the oldest kept ones; the latest good is protected
        (RetentionPolicy(keep_last=5, max_total_bytes=250), HOURLY, {"h0", "h0.5"}),
    ],
)
def test_grammar(policy: RetentionPolicy, given: list[Item], kept: set[str]) -> None:
    verdicts = decide(policy, given, protected=frozenset({given[0].id}))
    assert {v.id for v in verdicts if v.keep} == kept
    assert [v.id for v in verdicts] == [
        i.id for i in sorted(given, key=lambda i: i.created, reverse=True)
    ]


def test_reasons_name_every_rule_that_kept() -> None:
    v = decide(RetentionPolicy(keep_last=1, keep_daily=1), HOURLY)[0]
    assert v.reasons == ["last", "daily"]


def test_pinned_and_latest_good_are_never_removed() -> None:
    given = items(0 * H, 1 * H, 2 * H, 3 * H)
    verdicts = decide(
        RetentionPolicy(keep_last=1, max_total_bytes=50),
        given,
        pinned=frozenset({"h3"}),
        protected=frozenset({"h1"}),
    )
    assert {v.id: v.keep for v in verdicts} == {"h0": False, "h1": True, "h2": False, "h3": True}


def test_empty_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one keep"):
        RetentionPolicy()
    with pytest.raises(ValueError, match="at least one keep"):
        RetentionPolicy(max_total_bytes=10)
