"""The clocks storage reads, as one parameter: a repository, its commits, its dedup index
and garbage collection take them from here instead of reading `time` themselves, so that a
simulation (bench/fleet_scale.py) runs the real code on a virtual clock without patching
modules. The wall clock names things (checkpoint and pack ids, a manifest's creation time)
and is compared only with the store's own times (GC's grace); the monotonic clock measures
how long this process has seen something (a stray manifest's grace)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime


def _wall() -> float:
    return time.time()


def _monotonic() -> float:
    return time.monotonic()


@dataclass(frozen=True)
class Clock:
    wall: Callable[[], float] = _wall  # Unix seconds
    monotonic: Callable[[], float] = _monotonic

    def now(self) -> datetime:
        """The wall clock as an aware UTC datetime."""
        return datetime.fromtimestamp(self.wall(), UTC)


SYSTEM = Clock()
