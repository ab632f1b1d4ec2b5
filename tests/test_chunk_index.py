"""The deduplication index: every chunk added is found in its pack, nothing else is."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from storage import Repository, chunk_index, keys
from storage.backends import LocalBlobStore
from storage.chunk_index import ChunkIndex

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def digests(n: int) -> bytes:
    return os.urandom(32 * n)


def pack_of(index: ChunkIndex, blob: bytes) -> list[str | None]:
    return [index.pack_id(int(n)) if n >= 0 else None for n in index.lookup(blob)]


def test_added_chunks_are_found_in_their_pack_and_others_are_not() -> None:
    index = ChunkIndex()
    a, b, unknown = digests(100), digests(50), digests(30)
    index.add("pack-a", a)
    index.add_many([("pack-b", b)])
    assert pack_of(index, a) == ["pack-a"] * 100
    assert pack_of(index, b) == ["pack-b"] * 50
    assert pack_of(index, unknown) == [None] * 30
    mixed = a[:32] + unknown[:32] + b[:32]
    assert pack_of(index, mixed) == ["pack-a", None, "pack-b"]
    assert len(index) == 150


def test_recent_additions_merge_into_the_sorted_arrays_without_losing_any() -> None:
    index = ChunkIndex()
    packs = [(f"p{i}", digests(700)) for i in range(40)]  # past _MERGE_AT: several merges
    assert chunk_index._MERGE_AT < 40 * 700
    for pack_id, blob in packs:
        index.add(pack_id, blob)
    assert len(index._recent) < chunk_index._MERGE_AT  # merged, not all held in the dict
    for pack_id, blob in packs:
        assert pack_of(index, blob) == [pack_id] * 700
    assert len(index) == 40 * 700


def test_a_chunk_held_by_two_packs_is_counted_once() -> None:
    index = ChunkIndex()
    shared = digests(10)
    index.add_many([("first", shared), ("second", shared)])
    index.add("third", shared)
    assert len(index) == 10
    assert set(pack_of(index, shared)) == {"first"}


def test_digests_sharing_their_first_word_are_told_apart() -> None:
    index = ChunkIndex()
    prefix = os.urandom(8)
    same_start = [prefix + os.urandom(24) for _ in range(5)]
    index.add_many([(f"p{i}", d) for i, d in enumerate(same_start[:4])])
    found = pack_of(index, b"".join(same_start))
    assert found == ["p0", "p1", "p2", "p3", None]


def test_forgotten_packs_are_no_longer_found() -> None:
    index = ChunkIndex()
    a, b = digests(20), digests(20)
    index.add_many([("a", a)])
    index.add("b", b)  # still in the recent dict
    index.forget({"a", "b", "never-added"})
    assert pack_of(index, a + b) == [None] * 40


def test_merge_into_adds_what_the_other_index_lacks() -> None:
    old, fresh = ChunkIndex(), ChunkIndex()
    a, b = digests(30), digests(30)
    old.add("a", a)
    old.add("b", b)
    fresh.add_many([("a", a)])
    old.merge_into(fresh, keep=lambda pack: True)
    assert pack_of(fresh, a + b) == ["a"] * 30 + ["b"] * 30
    assert np.all(fresh.lookup(a + b) >= 0)


def test_merge_into_leaves_out_packs_not_kept() -> None:
    """A refresh must not bring back packs that are gone (deleted by another host's GC)."""
    old, fresh = ChunkIndex(), ChunkIndex()
    a, b = digests(30), digests(30)
    old.add("gone", a)
    old.add("mine", b)
    old.merge_into(fresh, keep=lambda pack: pack == "mine")
    assert pack_of(fresh, a + b) == [None] * 30 + ["mine"] * 30


class Reads(LocalBlobStore):
    """A folder store recording the keys read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read: list[str] = []

    def get(self, key: str, limit: int | None = None) -> bytes:
        self.read.append(key)
        return super().get(key, limit)


def test_a_refresh_reads_only_its_workloads_manifests_and_the_packs_it_does_not_hold(
    tmp_path: Path,
) -> None:
    """A host holds the chunk indexes of its own workloads only: refreshing one reads that
    workload's new manifests and the indexes of its packs not held yet, nothing of the
    other workloads in the repository; a workload that moved away leaves no index behind."""
    store = Reads(tmp_path / "repo")
    here, elsewhere = Repository(store), Repository(store)  # two hosts, one repository

    def folder(name: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "pages-1.img").write_bytes(os.urandom(5 * 1024 * 1024))
        return tmp_path / name

    here.commit("w", folder("w1"))
    here.commit("w", folder("w2"))
    elsewhere.commit("v", folder("v1"))
    moved = elsewhere.commit("w", folder("w3"))  # w's packs this host does not hold
    store.read.clear()
    here.dedup.expire()
    here.commit("w", folder("w4"))
    assert sorted(store.read) == sorted(
        [keys.manifest_key("w", moved.id)] + [keys.index_key(p, "w") for p in moved.packs]
    )
    here.keep_only(["v"])  # w moved to another host
    assert here.known_chunks("w") is None
