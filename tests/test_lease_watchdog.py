"""The lease watchdog and the deadman on their own: every copy stopped at the heartbeat's
deadline whatever the store does, resumed only once its lease is written again as ours, a
lease taken meanwhile lost, and the deadman stopping a real process on time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from checkpointer.daemon.lease_watchdog import LeaseWatchdog
from checkpointer.workloads import process
from checkpointer.workloads.deadman import Deadman, boottime
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.wrapper import WrappedBlobStore
from storage.crypto import Sealed, new_master
from storage.heartbeats import Heartbeats
from storage.leases import Leases

T = TypeVar("T")
TTL, SKEW, RENEW = 2.0, 0.5, 0.25


class Hangs(WrappedBlobStore):
    """Heartbeat writes block while `hanging` is set, until `release` is (a bucket that
    stopped answering, as seen through ~60 s of retries)."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.hanging = False
        self.release = threading.Event()

    def around(self, op: str, fn: Callable[[], T]) -> T:
        return fn()

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        if key.startswith("hosts/") and self.hanging:
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


Watched = tuple[Hangs, Leases, LeaseWatchdog, Recorded, list[str]]


def watchdog(store: BlobStore, lost: list[str]) -> tuple[Leases, LeaseWatchdog]:
    codec = Sealed(new_master())
    leases = Leases(store, codec, "a")
    beats = Heartbeats(store, codec, "a", TTL)
    return leases, LeaseWatchdog(
        leases, beats, (TTL, SKEW, RENEW), lambda held: None, lost.append, lambda: None
    )


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    store = Hangs(LocalBlobStore(tmp_path / "repo"))
    lost: list[str] = []
    leases, dog = watchdog(store, lost)
    copies = Recorded()
    dog.beat()
    for name in ("web", "db"):
        dog.claimed(name, leases.acquire(name))
        dog.beat(need=name)
    dog.start(copies)
    try:
        yield store, leases, dog, copies, lost
    finally:
        store.release.set()
        dog.stop()


def test_a_claim_acts_only_once_a_heartbeat_names_it(tmp_path: Path) -> None:
    leases, dog = watchdog(LocalBlobStore(tmp_path / "repo"), [])
    dog.beat()
    dog.claimed("web", leases.acquire("web"))
    assert dog.held("web") is not None and not dog.acting("web")
    dog.beat(need="web")
    assert dog.acting("web")
    version = dog.heartbeats.version
    dog.beat(need="web")  # named already: no second write
    assert dog.heartbeats.version == version


def test_a_hanging_heartbeat_stops_every_copy_at_the_deadline_and_the_late_one_resumes_them(
    watched: Watched,
) -> None:
    store, leases, dog, copies, _ = watched
    before = {n: store.get_versioned(f"leases/{n}")[1] for n in ("web", "db")}
    store.hanging = True  # heartbeats hang from now on
    t0 = time.monotonic()
    deadline = copies.deadlines["web"]
    assert copies.deadlines["db"] == deadline  # one deadline for all of the host's leases
    while len(copies.frozen) < 2 and time.monotonic() < t0 + 5:
        time.sleep(0.01)
    assert set(copies.frozen) == {"web", "db"}
    for name in ("web", "db"):
        assert deadline <= copies.frozen[name] <= deadline + 0.2, copies.frozen[name] - deadline
        assert not dog.acting(name)
    store.hanging = False
    store.release.set()  # the bucket answers again: the late heartbeat lands
    while len(copies.thawed) < 2 and time.monotonic() < t0 + 10:
        time.sleep(0.01)
    assert set(copies.thawed) == {"web", "db"} and dog.acting("web") and dog.acting("db")
    for name in ("web", "db"):  # written again (ours, same generation) before they ran
        held = leases.read(name)
        assert held is not None and held.version != before[name]
        assert held.lease.generation == 1 and held.lease.holder == "a"


def test_a_lease_taken_while_the_heartbeat_hung_is_lost_and_its_copy_never_resumed(
    watched: Watched,
) -> None:
    store, leases, dog, copies, lost = watched
    store.hanging = True
    t0 = time.monotonic()
    while len(copies.frozen) < 2 and time.monotonic() < t0 + 5:
        time.sleep(0.01)
    current = leases.read("db")  # b found a dead and took db over
    assert current is not None
    taken = replace(current.lease, holder="b", generation=current.lease.generation + 1)
    store.put_if("leases/db", leases.codec.seal("leases/db", taken.to_json()), current.version)
    store.hanging = False
    store.release.set()
    while not lost and time.monotonic() < t0 + 10:
        time.sleep(0.01)
    time.sleep(0.2)
    assert lost == ["db"] and dog.held("db") is None and "db" not in copies.thawed
    assert "db" not in copies.deadlines  # the deadman no longer guards it
    assert "web" in copies.thawed and dog.acting("web")


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
        deadline = boottime() + 1.0
        deadman.arm("web", tree.pid, process.start_time(tree.pid), deadline)
        deadman.arm("db", spared.pid, process.start_time(spared.pid), deadline)
        deadman.disarm("db")  # moved on, then given up: not this deadman's any more
        deadman.close()  # the daemon stops: its deadlines stand
        while process.state(tree.pid) != "T" and boottime() < deadline + 3:
            time.sleep(0.01)
        assert process.state(tree.pid) == "T"
        assert boottime() - deadline < 0.5
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


def test_the_deadman_counts_a_suspend_of_the_machine(tmp_path: Path) -> None:
    """A machine suspended past its TTL: other hosts counted the suspend and took its leases,
    so on resume the deadline must have passed. The deadman runs in a time namespace whose
    CLOCK_BOOTTIME is 200 s ahead of ours, as after a 200 s suspend (CLOCK_MONOTONIC, which
    stops during a suspend, is not moved): a tree armed with a deadline 100 s away is
    stopped at once. On CLOCK_MONOTONIC (before) it ran on for the 100 s."""
    tree = subprocess.Popen(["sleep", "60"])
    deadman = Deadman(tmp_path)
    deadman.proc = proc = subprocess.Popen(
        ["unshare", "--time", "--boottime", "200", sys.executable, "-I", "-m", deadman_module()],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    try:
        # No start time: /proc shows start times shifted into the reader's time namespace.
        deadman.arm("web", tree.pid, None, boottime() + 100)
        deadman.close()
        until = time.monotonic() + 5
        while process.state(tree.pid) != "T" and time.monotonic() < until:
            time.sleep(0.01)
        assert process.state(tree.pid) == "T", "the tree runs on after a suspend past its TTL"
        assert proc.wait(5) == 0  # nothing left to guard: it went
    finally:
        tree.kill()
        tree.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def deadman_module() -> str:
    return Deadman.__module__
