"""Leases: one owner per workload, decided by the store's conditional writes; taken from
another host only once it is found dead (tests/test_fleet_liveness.py has the judgement)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from checkpointer.daemon.fleet_scan import LeaseSweep
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.crypto import Sealed, new_master
from storage.errors import ConditionalWritesUnsupported
from storage.leases import (
    Lease,
    LeaseHeld,
    LeaseLost,
    Leases,
    LeaseState,
    probe_conditional_writes,
)
from tests.support import S3_ENV, Moto


def s3_store(moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    return S3BlobStore(
        S3Settings(bucket=bucket, prefix="fleet", endpoint_url=moto.url, region="us-east-1")
    )


def test_two_hosts_racing_for_a_free_lease_50_times_give_one_owner_each_time(
    tmp_path: Path,
) -> None:
    """On the local store, whose conditional writes are atomic (an flock): moto's check then
    set is not atomic under its threaded server, and let both hosts win about one
    run in six, before heartbeats as after. The S3 path is tested in test_lease_faults.py."""
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    hosts = {h: Leases(store, codec, h) for h in ("a", "b")}
    for round_ in range(50):
        name = f"w{round_}"
        won: list[str] = []
        lost: list[str] = []
        start = threading.Barrier(2)

        def take(
            host: str,
            name: str = name,
            won: list[str] = won,
            lost: list[str] = lost,
            start: threading.Barrier = start,
        ) -> None:
            start.wait()
            try:
                hosts[host].acquire(name)
                won.append(host)
            except LeaseHeld:
                lost.append(host)

        threads = [threading.Thread(target=take, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1 and len(lost) == 1, (round_, won, lost)
        held = hosts["a"].read(name)
        assert held is not None and held.lease.holder == won[0] and held.lease.generation == 1


def test_a_lease_is_taken_over_only_while_its_holder_is_dead_and_its_holder_then_loses_it(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    dead: set[str] = set()
    asked: list[str] = []

    def holder_dead(host: str) -> bool:
        asked.append(host)  # asked after the lease was read, before it is written
        return host in dead

    a = Leases(store, codec, "a")
    b = Leases(store, codec, "b", holder_dead=holder_dead)
    held_a = a.acquire("web")
    with pytest.raises(LeaseHeld, match="owned by host a"):
        b.acquire("web")  # a is alive
    assert asked == ["a"]
    dead.add("a")
    held_b = b.acquire("web")
    assert held_b.lease.generation == 2 and held_b.lease.previous_holder == "a"
    with pytest.raises(LeaseLost, match="held by b"):
        a.reassert(held_a)  # a was paused: it finds out it lost the lease
    again = a.read("web")
    assert again is not None and again.lease.holder == "b"


def test_a_lease_of_the_previous_version_is_read_and_its_newest_before_ignored() -> None:
    """Leases written before heartbeats carried `expires`, `ttl` and `newest_before`: read,
    those fields say nothing any more (the head decides what exists)."""
    old = (
        b'{"version": 1, "workload": "web", "holder": "a", "generation": 3, "expires": 1e9, '
        b'"state": "held", "previous_holder": "b", "newest_before": "20260101T000000Z-1", '
        b'"next_holder": null, "ttl": 30.0}'
    )
    lease = Lease.from_json(old, "web")
    assert (lease.holder, lease.generation, lease.state) == ("a", 3, LeaseState.HELD)
    assert lease.previous_holder == "b" and lease.written == 1e9
    assert not hasattr(lease, "newest_before")


def test_hand_over_and_release(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    a, b, c = (Leases(store, codec, h) for h in "abc")
    held = a.acquire("web")
    handed = a.hand_over(held, "b")
    assert handed.lease.state is LeaseState.HANDED
    with pytest.raises(LeaseHeld):
        c.acquire("web")  # handed to b, not to anyone
    taken = b.acquire("web")
    assert taken.lease.holder == "b" and taken.lease.generation == 2
    b.release(taken)
    assert c.acquire("web").lease.holder == "c"


def test_a_planted_lease_leases_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    a = Leases(store, Sealed(new_master()), "a")
    planted = Lease("web", "evil", 99).to_json()
    store.put_if("leases/web", planted, None)
    sweep = LeaseSweep(store, a)
    assert sweep.run() == [] and sweep.run() == []


class IgnoresConditions(LocalBlobStore):
    """What s3rver 3.7 does: accepts If-None-Match and a wrong If-Match, and overwrites."""

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return "v"


def test_the_probe_refuses_a_store_that_ignores_conditional_writes(
    tmp_path: Path, moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConditionalWritesUnsupported, match="without fleet"):
        probe_conditional_writes(IgnoresConditions(tmp_path / "bad"))
    good: BlobStore = s3_store(moto, bucket, monkeypatch)
    probe_conditional_writes(good)
    probe_conditional_writes(good)  # again, with the probe object there
