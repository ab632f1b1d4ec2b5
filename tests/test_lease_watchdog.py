"""The lease watchdog and the deadman on their own: deadlines kept whatever the store does,
one slow lease holding up no other, and the deadman stopping a real process on time."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from checkpointer.daemon.lease_watchdog import LeaseWatchdog
from checkpointer.workloads import process
from checkpointer.workloads.deadman import Deadman
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.wrapper import WrappedBlobStore
from storage.crypto import Sealed, new_master
from storage.leases import Leases

T = TypeVar("T")
TTL, SKEW, RENEW = 2.0, 0.5, 0.25


class Hangs(WrappedBlobStore):
    """Lease writes of the workloads in `hanging` block until `release` is set (a bucket
    that stopped answering, as seen through ~60 s of retries)."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.hanging: set[str] = set()
        self.release = threading.Event()

    def around(self, op: str, fn: Callable[[], T]) -> T:
        return fn()

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        if key.rsplit("/", 1)[-1] in self.hanging:
            self.release.wait(30)
        return self.inner.put_if(key, data, match)


class Recorded:
    """The copies as the watchdog sees them: when each was stopped and resumed."""

    def __init__(self) -> None:
        self.frozen: dict[str, float] = {}
        self.thawed: dict[str, float] = {}
        self.deadlines: dict[str, float] = {}

    def freeze(self, name: str) -> bool:
        self.frozen.setdefault(name, time.monotonic())
        return True

    def thaw(self, name: str) -> None:
        self.thawed[name] = time.monotonic()

    def guard(self, name: str, deadline: float) -> None:
        self.deadlines[name] = deadline

    def unguard(self, name: str) -> None:
        self.deadlines.pop(name, None)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Hangs, Leases, LeaseWatchdog, Recorded, list[str]]]:
    store = Hangs(LocalBlobStore(tmp_path / "repo"))
    leases = Leases(store, Sealed(new_master()), "a", ttl=TTL, skew=SKEW)
    lost: list[str] = []
    dog = LeaseWatchdog(leases, RENEW, lambda held: None, lost.append, lambda: None)
    copies = Recorded()
    for name in ("slow", "fast"):
        sent = time.monotonic()
        dog.kept(name, leases.acquire(name, None), sent)
    dog.start(copies)
    try:
        yield store, leases, dog, copies, lost
    finally:
        store.release.set()
        dog.stop()


def test_a_hanging_renewal_stops_its_copy_at_the_deadline_and_holds_up_no_other_lease(
    watched: tuple[Hangs, Leases, LeaseWatchdog, Recorded, list[str]],
) -> None:
    store, _, dog, copies, _ = watched
    store.hanging.add("slow")
    t0 = time.monotonic()
    deadline = copies.deadlines["slow"]  # renewals of "slow" hang from now on
    while "slow" not in copies.frozen and time.monotonic() < t0 + 5:
        time.sleep(0.01)
    assert "slow" in copies.frozen
    assert deadline <= copies.frozen["slow"] <= deadline + 0.2, copies.frozen["slow"] - deadline
    assert not dog.acting("slow") and dog.acting("fast")
    assert "fast" not in copies.frozen  # renewed all along, in parallel
    assert copies.deadlines["fast"] > time.monotonic() + TTL - SKEW - RENEW - 0.3
    store.release.set()  # the bucket answers again: the lease was ours all along
    while "slow" not in copies.thawed and time.monotonic() < t0 + 10:
        time.sleep(0.01)
    assert "slow" in copies.thawed and dog.acting("slow")


def test_a_lease_taken_meanwhile_is_lost_and_its_copy_stopped_at_once(
    watched: tuple[Hangs, Leases, LeaseWatchdog, Recorded, list[str]],
) -> None:
    store, leases, dog, copies, lost = watched
    other = Leases(store, leases.codec, "b", ttl=TTL, skew=SKEW)
    current = other.read("fast")
    assert current is not None  # b takes it (as after a partition A did not notice)
    taken = replace(current.lease, holder="b", generation=current.lease.generation + 1)
    store.put_if("leases/fast", leases.codec.seal("leases/fast", taken.to_json()), current.version)
    t0 = time.monotonic()
    while "fast" not in lost and time.monotonic() < t0 + 3:
        time.sleep(0.01)
    assert lost == ["fast"] and "fast" in copies.frozen and dog.held("fast") is None
    assert "fast" not in copies.deadlines  # the deadman no longer guards it
    assert "slow" not in copies.frozen


def test_the_deadman_stops_a_tree_at_its_deadline_even_after_the_daemon_is_gone(
    tmp_path: Path,
) -> None:
    tree = subprocess.Popen(["sleep", "60"])
    spared = subprocess.Popen(["sleep", "60"])
    deadman = Deadman(tmp_path)
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        deadman.start()
        assert deadman.proc is not None
        helpers.append(deadman.proc)
        deadline = time.monotonic() + 1.0
        deadman.arm("web", tree.pid, process.start_time(tree.pid), deadline)
        deadman.arm("db", spared.pid, process.start_time(spared.pid), deadline)
        deadman.disarm("db")  # moved on, then given up: not this deadman's any more
        deadman.close()  # the daemon stops: its deadlines stand
        while process.state(tree.pid) != "T" and time.monotonic() < deadline + 3:
            time.sleep(0.01)
        assert process.state(tree.pid) == "T"
        assert time.monotonic() - deadline < 0.5
        assert process.state(spared.pid) == "S"
        assert helpers[0].wait(5) == 0  # nothing left to guard: it went
        again = Deadman(tmp_path)
        again.start()
        assert again.proc is not None
        helpers.append(again.proc)
        again.close()
        assert helpers[1].wait(5) == 0
    finally:
        for p in (tree, spared, *helpers):
            p.kill()
            p.wait()
