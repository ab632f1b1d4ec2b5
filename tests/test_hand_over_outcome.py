"""A hand-over whose write failed in the store may still have landed: migrate asks the lease
before it lets the tree run on here (checkpointer/engine/migration.py)."""

from __future__ import annotations

from checkpointer.engine.migration import _handed
from storage.errors import TransientStorageError
from storage.leases import Lease, LeaseState


class Bucket:
    """The fleet as migrate sees it: the lease, or a bucket that cannot say (n times)."""

    def __init__(self, lease: Lease | None, unreadable: int = 0) -> None:
        self.lease_now, self.unreadable = lease, unreadable

    def lease(self, name: str) -> Lease | None:
        if self.unreadable:
            self.unreadable -= 1
            raise TransientStorageError("the bucket is unreachable")
        return self.lease_now


def lease(holder: str, state: LeaseState) -> Lease:
    return Lease("web", holder, 2, 0.0, state)


def test_a_hand_over_that_landed_is_known_as_landed() -> None:
    assert _handed(Bucket(lease("b", LeaseState.HANDED)), "web", "b", patience=1) is True  # type: ignore[arg-type]


def test_a_hand_over_that_did_not_land_lets_the_tree_run_here() -> None:
    assert _handed(Bucket(lease("a", LeaseState.PREPARING)), "web", "b", patience=1) is False  # type: ignore[arg-type]


def test_an_unreadable_lease_is_asked_again_then_unknown() -> None:
    assert _handed(Bucket(lease("b", LeaseState.HANDED), 1), "web", "b", patience=5) is True  # type: ignore[arg-type]
    assert _handed(Bucket(None, 100), "web", "b", patience=0.5) is None  # type: ignore[arg-type]
