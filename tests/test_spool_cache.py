"""The spool's cache of blobs read from the remote (storage/backends/spooled.py): filled by a
thread of its own, so a restore from the bucket never waits for the local disk, kept under its
size limit, and never given the packs a restore reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.backends.local import LocalBlobStore
from storage.backends.spooled import SpooledBlobStore

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def test_blobs_read_from_the_remote_are_cached_and_the_cache_kept_under_its_limit(
    tmp_path: Path,
) -> None:
    remote = LocalBlobStore(tmp_path / "remote")
    blobs = {f"packs/aa/{i:032x}.idx": os.urandom(100_000) for i in range(8)}
    for key, data in blobs.items():
        remote.put(key, data)
    spool = SpooledBlobStore(remote, tmp_path / "spool", cache_max_bytes=450_000)
    try:
        for key, data in blobs.items():
            assert spool.get(key) == data
            assert spool.wait_cached()
        cached = set(spool.cache.list("packs/"))
        oldest, *_, newest = blobs
        # The newest reads are kept, within the limit; the oldest were dropped.
        assert 1 <= len(cached) <= 4 and newest in cached and oldest not in cached
        # A cached blob is served from the cache, even with the remote gone.
        remote.delete(newest)
        assert spool.get(newest) == blobs[newest]
        # Packs read from the remote are not copied (what they rebuild is kept instead).
        remote.put("packs/bb/" + "b" * 32 + ".pack", b"pack")
        assert spool.get("packs/bb/" + "b" * 32 + ".pack") == b"pack"
        assert spool.wait_cached() and not list(spool.cache.list("packs/bb/"))
    finally:
        spool.close()
