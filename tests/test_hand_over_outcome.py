"""A hand-over whose write failed in the store may still have landed: migrate asks the lease
before it lets the tree run on here (checkpointer/engine/migration.py)."""

from __future__ import annotations

import pytest

from checkpointer.engine.migration import _handed
from storage.errors import TransientStorageError
from storage.leases import Lease, LeaseState

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


class Bucket:
    """The fleet as migrate sees it (this host is "a"): the lease, or a bucket that cannot
    say (n times)."""

    host = "a"

    def __init__(self, lease: Lease | None, unreadable: int = 0) -> None:
        self.lease_now, self.unreadable = lease, unreadable

    def lease(self, name: str) -> Lease | None:
        if self.unreadable:
            self.unreadable -= 1
            raise TransientStorageError("the bucket is unreachable")
        return self.lease_now


def lease(holder: str, state: LeaseState, generation: int = 2) -> Lease:
    return Lease("web", holder, generation, state)


def handed(bucket: Bucket, patience: float = 1) -> bool | None:
    return _handed(bucket, "web", 2, patience=patience)  # type: ignore[arg-type]


def test_a_hand_over_that_landed_ends_the_tree_here() -> None:
    assert handed(Bucket(lease("b", LeaseState.HANDED))) is True
    assert handed(Bucket(lease("b", LeaseState.HELD, 3))) is True  # and B took it already


def test_a_lease_taken_by_a_third_host_or_gone_never_thaws_the_tree() -> None:
    assert handed(Bucket(lease("c", LeaseState.HELD, 3))) is True
    assert handed(Bucket(None)) is True


def test_only_a_lease_still_ours_in_our_generation_lets_the_tree_run_here() -> None:
    assert handed(Bucket(lease("a", LeaseState.PREPARING))) is False
    assert handed(Bucket(lease("a", LeaseState.HELD))) is False
    assert handed(Bucket(lease("a", LeaseState.HELD, 3))) is True  # ours again, but later


def test_an_unreadable_lease_is_asked_again_then_unknown() -> None:
    assert handed(Bucket(lease("b", LeaseState.HANDED), 1), patience=5) is True
    assert handed(Bucket(None, 100), patience=0.5) is None
