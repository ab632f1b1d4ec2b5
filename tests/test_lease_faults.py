"""Leases under faults of the store: lost replies, replayed objects, stores that only pretend
to write conditionally. Unit-level, through storage/leases.py on moto (or a local folder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from checkpointer.config import Config
from checkpointer.daemon.fleet import Fleet
from checkpointer.daemon.fleet_scan import LeaseSweep
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.wrapper import WrappedBlobStore
from storage.crypto import Sealed, new_master
from storage.errors import TransientStorageError
from storage.heartbeats import Heartbeats, Liveness
from storage.leases import LeaseReplayed, Leases, LeaseState
from tests.support import Moto
from tests.test_leases import s3_store

T = TypeVar("T")


class LosesReplies(WrappedBlobStore):
    """Applies a conditional write, then loses its reply (`lose` more times): what a dropped
    connection after the request reached the store looks like to the writer."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.lose = 0

    def around(self, op: str, fn: Callable[[], T]) -> T:
        result = fn()
        if op == "put" and self.lose > 0:
            self.lose -= 1
            raise TransientStorageError("the reply was lost (connection reset)")
        return result


def test_a_lease_write_that_landed_but_whose_reply_was_lost_is_not_a_lost_lease(
    moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lossy = LosesReplies(s3_store(moto, bucket, monkeypatch))
    codec = Sealed(new_master())
    a = Leases(lossy, codec, "a")
    held = a.acquire("web")
    # A re-claim lands but its reply is lost: the fleet keeps the version it had.
    lossy.lose = 1
    with pytest.raises(TransientStorageError):
        a.reassert(held)
    renewed = a.reassert(held)  # the next write finds our own write: not a lost lease
    assert renewed.lease.holder == "a" and renewed.lease.generation == held.lease.generation
    # A prepare lands, its reply is lost; calling it off still finds the lease ours.
    lossy.lose = 1
    with pytest.raises(TransientStorageError):
        a.prepare(renewed, "b")
    called_off = a.prepare(renewed, None)
    assert called_off.lease.state is LeaseState.HELD
    # A hand-over lands, its reply is lost: asked again, it is done (not "changed under us").
    lossy.lose = 1
    with pytest.raises(TransientStorageError):
        a.hand_over(called_off, "b")
    handed = a.hand_over(called_off, "b")
    assert handed.lease.holder == "b" and handed.lease.state is LeaseState.HANDED
    lossy.lose = 1  # B's acquire lands, its reply is lost, the retrying layer asks again
    retrying = Leases(RetryingBlobStore(lossy, initial_wait=0.01), codec, "b")
    taken = retrying.acquire("web")
    assert taken.lease.holder == "b" and taken.lease.generation == held.lease.generation + 1
    assert retrying.reassert(taken).lease.holder == "b"


def test_lost_replies_on_a_local_store_too(tmp_path: Path) -> None:
    """The same on the local store (no S3 in the way): written again after lost replies."""
    lossy = LosesReplies(LocalBlobStore(tmp_path / "repo"))
    a = Leases(lossy, Sealed(new_master()), "a")
    held = a.acquire("web")
    for _ in range(3):
        lossy.lose = 1
        with pytest.raises(TransientStorageError):
            a.reassert(held)
    assert a.reassert(held).lease.generation == 1


def test_liveness_is_judged_on_the_observers_monotonic_clock_never_by_wall_clocks(
    tmp_path: Path,
) -> None:
    """A's wall clock is an hour behind B's, and says so in every heartbeat: B judges only
    by versions seen unchanged on its own monotonic clock."""
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    mono = [0.0]
    a = Heartbeats(store, codec, "a", ttl=10, clock=lambda: 1000.0)
    b = Liveness("b", ttl=10)

    def look() -> list[str]:
        sent = mono[0]
        return b.observe(Heartbeats(store, codec, "b", 10).listing(), sent, mono[0])

    for _ in range(100):  # 100 heartbeats, B looking every second: never suspected
        mono[0] += 1
        a.write({"web": 1}, {}, False)
        assert look() == []
    mono[0] += 9.5  # unchanged for less than TTL since B first saw this version
    assert look() == []
    mono[0] += 0.5
    assert look() == ["a"]
    version = a.version
    assert version is not None and b.confirm("a", version, 10.0, mono[0], mono[0])
    assert b.dead("a") == version
    mono[0] += 1
    a.write({"web": 1}, {}, False)  # back: alive again at the next listing
    assert look() == [] and b.dead("a") is None


def test_a_replayed_older_lease_is_refused_not_obeyed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    a, b = Leases(store, codec, "a"), Leases(store, codec, "b")
    held = a.acquire("web")
    old_sealed = store.get("leases/web")  # a bucket writer keeps generation 1, held by a
    handed = a.hand_over(held, "b")
    taken = b.acquire("web")
    assert taken.lease.generation == 2
    current = store.get_versioned("leases/web")[1]
    store.put_if("leases/web", old_sealed, current)  # ... and puts it back
    with pytest.raises(LeaseReplayed, match="older than generation 2"):
        b.read("web")
    with pytest.raises(LeaseReplayed):
        a.read("web")  # a handed generation 1 over: it is not a's again
    assert LeaseSweep(store, a).run() == [] and LeaseSweep(store, b).run() == []  # nobody obeys it
    with pytest.raises(LeaseReplayed):
        a.acquire("web")
    assert handed.lease.state is LeaseState.HANDED


def test_a_replay_is_refused_after_the_host_restarts_too(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    config = Config.model_validate({"state_dir": str(tmp_path / "state"), "host": {"id": "b"}})
    (tmp_path / "state").mkdir()
    a = Leases(store, codec, "a")
    held = a.acquire("web")
    old_sealed = store.get("leases/web")
    a.hand_over(held, "b")
    b = Fleet(config, store, codec)
    assert b.leases.acquire("web").lease.generation == 2
    b.stop()  # the daemon stops (or restarts): what it saw is kept in its state folder
    store.put_if("leases/web", old_sealed, store.get_versioned("leases/web")[1])
    again = Fleet(config, store, codec)
    with pytest.raises(LeaseReplayed, match="older than generation 2"):
        again.leases.read("web")
    again.stop()
