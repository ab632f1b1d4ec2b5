"""This host's clock against the object store's (its HTTP `Date`), checked at start and every
minute in fleet mode. Leases do not depend on it (their expiry is judged on monotonic clocks,
docs/fleet.md R5); a host far off is refused all the same, since checkpoint ids carry its
wall-clock time and operators read them."""

from __future__ import annotations

from collections.abc import Callable

from checkpointer.errors import FleetUnavailable
from storage.backends.base import BlobStore


class ClockSkewed(FleetUnavailable):
    """This host's clock and the store's differ by more than fleet.clock_skew."""

    def __init__(self, message: str, offset: float) -> None:
        super().__init__(message)
        self.offset = offset


def store_clock_offset(store: BlobStore, clock: Callable[[], float], skew: float) -> float | None:
    """This clock minus the store's (None: the store reports no time); ClockSkewed when they
    surely differ by more than `skew`."""
    before = clock()
    server = store.server_time()
    after = clock()
    if server is None:
        return None
    # The Date header truncates to the second: the server's time when it answered lies
    # in [server, server + 1), ours in [before, after].
    offset = server + 0.5 - (before + after) / 2
    if abs(offset) - (0.5 + (after - before) / 2) > skew:
        raise ClockSkewed(
            f"this host's clock differs from the store's ({store.describe()}) by "
            f"{offset:+.1f}s, more than fleet.clock_skew ({skew:g}s): fleet mode is refused "
            "until the clock is synchronised (check chronyd / systemd-timesyncd: "
            "`timedatectl status`)",
            offset,
        )
    return offset
