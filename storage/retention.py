"""Which checkpoints to keep: restic's `forget` grammar and semantics, in UTC.

- Rules are independent and ORed: a checkpoint is kept if any rule keeps it.
- `keep_last N` keeps the N newest.
- `keep_hourly/daily/weekly/monthly/yearly N` keep the newest checkpoint in each of the N most
  recent calendar buckets (UTC hours, days, ISO weeks Monday-Sunday, months, years) that hold
  one; buckets without a checkpoint do not count.
- `keep_within D` keeps everything created within D of the *newest* checkpoint (not of now,
  so a workload that stopped checkpointing does not lose its history by waiting).
- Pinned checkpoints, the latest good one and the newest verified one (a restore drill proved
  it restores: the one to fall back on when newer ones fail) are always kept.
- `max_total_bytes` then removes the oldest kept checkpoints (never a pinned one, the latest
  good one or the newest verified one) until the sum of their image sizes fits.
An empty policy is refused: it would delete everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

RULES = (
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within",
    "max_total_bytes",
)


class RetentionPolicy(Protocol):
    """The rules, as the config's `Retention` model holds them (the one model of a policy;
    storage reads it through this protocol and knows nothing of the config)."""

    @property
    def keep_last(self) -> int | None: ...
    @property
    def keep_hourly(self) -> int | None: ...
    @property
    def keep_daily(self) -> int | None: ...
    @property
    def keep_weekly(self) -> int | None: ...
    @property
    def keep_monthly(self) -> int | None: ...
    @property
    def keep_yearly(self) -> int | None: ...
    @property
    def keep_within(self) -> float | None: ...  # seconds
    @property
    def max_total_bytes(self) -> int | None: ...


def check_policy(policy: RetentionPolicy) -> None:
    """Refuse a policy that keeps nothing: it would delete every checkpoint."""
    if all(getattr(policy, r) is None for r in RULES[:-1]):
        raise ValueError(
            "a retention policy needs at least one keep_* rule "
            "(an empty policy would remove every checkpoint)"
        )


@dataclass(frozen=True)
class Item:
    id: str
    created: datetime  # aware, UTC
    size_bytes: int = 0


@dataclass
class Verdict:
    id: str
    created: datetime
    keep: bool = False
    reasons: list[str] = field(default_factory=list)


_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "keep_hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "keep_daily": lambda t: (t.year, t.month, t.day),
    "keep_weekly": lambda t: tuple(t.isocalendar()[:2]),
    "keep_monthly": lambda t: (t.year, t.month),
    "keep_yearly": lambda t: (t.year,),
}


def decide(
    policy: RetentionPolicy,
    items: list[Item],
    pinned: frozenset[str] = frozenset(),
    protected: frozenset[str] = frozenset(),
    verified: frozenset[str] = frozenset(),
) -> list[Verdict]:
    """A verdict per checkpoint, newest first, with the rules that kept it. `verified`: the
    checkpoints a restore drill proved (and nothing has marked bad since); the newest of them
    is kept."""
    check_policy(policy)
    items = sorted(items, key=lambda i: (i.created, i.id), reverse=True)
    verdicts = [Verdict(i.id, i.created) for i in items]
    newest_verified = next((v.id for v in verdicts if v.id in verified), None)

    def keep(v: Verdict, why: str) -> None:
        v.keep = True
        v.reasons.append(why)

    if policy.keep_last:
        for v in verdicts[: policy.keep_last]:
            keep(v, "last")
    for rule, bucket_of in _BUCKETS.items():
        n = getattr(policy, rule)
        if not n:
            continue
        seen: set[tuple[int, ...]] = set()
        for v in verdicts:
            b = bucket_of(v.created)
            if b in seen:
                continue
            if len(seen) >= n:
                break
            seen.add(b)
            keep(v, rule.removeprefix("keep_"))
    if policy.keep_within is not None and verdicts:
        since = verdicts[0].created - timedelta(seconds=policy.keep_within)
        for v in verdicts:
            if v.created >= since:
                keep(v, "within")
    for v in verdicts:
        if v.id in pinned:
            keep(v, "pinned")
        if v.id in protected:
            keep(v, "latest good")
        if v.id == newest_verified:
            keep(v, "newest verified")
    if policy.max_total_bytes is not None:
        sizes = {i.id: i.size_bytes for i in items}
        total = sum(sizes[v.id] for v in verdicts if v.keep)
        for v in reversed(verdicts):  # oldest first
            if total <= policy.max_total_bytes:
                break
            spared = v.id in pinned or v.id in protected or v.id == newest_verified
            if v.keep and not spared:
                v.keep = False
                v.reasons = [f"over max_total_bytes ({policy.max_total_bytes})"]
                total -= sizes[v.id]
    return verdicts
