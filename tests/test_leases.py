"""Leases: one owner per workload, decided by the store's conditional writes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

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
    may_restore,
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
    moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_store(moto, bucket, monkeypatch)
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
                hosts[host].acquire(name, None)
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


def test_expiry_takeover_and_fencing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    now = [1000.0]
    a = Leases(store, codec, "a", ttl=30, skew=5, clock=lambda: now[0], monotonic=lambda: now[0])
    b = Leases(store, codec, "b", ttl=30, skew=5, clock=lambda: 9e9, monotonic=lambda: now[0])
    held_a = a.acquire("web", newest=None)
    with pytest.raises(LeaseHeld, match="owned by host a"):
        b.acquire("web", newest="c1")  # b sees it first now (its wall clock is far ahead)
    now[0] += 34  # unchanged for 34 s, less than TTL + skew: still a's
    with pytest.raises(LeaseHeld):
        b.acquire("web", newest="c1", taking_over=True)
    now[0] += 2  # seen unchanged for more than TTL + skew
    held_b = b.acquire("web", newest="c1", taking_over=True)
    assert held_b.lease.generation == 2 and held_b.lease.previous_holder == "a"
    with pytest.raises(LeaseLost, match="held by b"):
        a.renew(held_a)  # a was paused: it finds out it lost the lease
    # What b may restore: its own generation, or what existed when it took over.
    assert may_restore(held_b.lease, "c1", 1)
    assert may_restore(held_b.lease, "c0", None)
    assert not may_restore(held_b.lease, "c2", 1)  # a committed it after losing the lease
    assert may_restore(held_b.lease, "c3", 2)


def test_hand_over_and_release(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    codec = Sealed(new_master())
    a, b, c = (Leases(store, codec, h) for h in "abc")
    held = a.acquire("web", newest=None)
    handed = a.hand_over(held, "b")
    assert handed.lease.state is LeaseState.HANDED
    with pytest.raises(LeaseHeld):
        c.acquire("web", newest=None)  # handed to b, not to anyone
    taken = b.acquire("web", newest="c9")
    assert taken.lease.holder == "b" and taken.lease.generation == 2
    b.release(taken)
    assert c.acquire("web", newest=None).lease.holder == "c"


def test_a_planted_lease_leases_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    a = Leases(store, Sealed(new_master()), "a")
    planted = Lease("web", "evil", 99, 1e12).to_json()
    store.put_if("leases/web", planted, None)
    assert a.all() == []


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
