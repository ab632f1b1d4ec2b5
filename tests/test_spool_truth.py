"""A shared bucket never loses a listed checkpoint to another host's retention or GC.

Every host here is the daemon's own storage stack (`open_repository`: spool and cache,
retrying, S3 on a real moto_server over HTTP), with its own state folder: no lock is shared,
only the bucket. Garbage collection runs with a grace of a few seconds, so that it really
deletes (docs/fleet.md, R1 and R2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.errors import TransientStorageError
from storage.gc import collect_garbage
from tests.support import ROOT, S3_ENV, Moto
from tests.support.s3_proxy import S3Proxy
from tests.support.storage_hosts import (
    GRACE,
    StorageHosts,
    image,
    restorable_everywhere,
    storage_hosts,
)


@pytest.fixture
def hosts(tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageHosts]:
    """Hosts opened on demand by name (`hosts.open(name, url)`), closed at the end."""
    yield from storage_hosts(tmp_path, bucket, monkeypatch)


def test_another_hosts_retention_and_gc_between_two_commits_of_the_same_pages(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    b_repo, b_spool = hosts.open("b", moto.url)
    a_repo, a_spool = hosts.open("a", moto.url)
    c_repo, c_spool = hosts.open("c", moto.url)
    pages = image(tmp_path / "img", 1)
    x = b_repo.commit("w", pages)
    assert b_spool.wait_uploaded(60)
    assert [i.id for i in b_repo.checkpoints("w")] == [x.id]  # B's cache holds X now

    a_repo.delete("w", x.id)  # A's retention removes X ...
    assert a_spool.wait_uploaded(60)
    time.sleep(GRACE + 0.5)
    gc = collect_garbage(c_repo, ["w"])  # ... and C's garbage collection its packs
    assert set(x.packs) <= set(gc.deleted_packs)
    assert c_spool.wait_uploaded(60)

    # B lists what the bucket has, not its cache; and its next commit of the very same
    # pages must not reference the packs that were collected.
    assert b_repo.checkpoints("w") == []
    y = b_repo.commit("w", pages)
    assert y.new_bytes > 0
    assert b_spool.wait_uploaded(60)
    assert restorable_everywhere(hosts, "w") == [y.id]
    assert not b_spool.cache.exists(f"manifests/w/{x.id}.json")  # the cache forgot X


def test_an_outage_longer_than_gc_grace_between_packs_and_manifest(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    proxy = S3Proxy(moto.url)
    try:
        a_repo, a_spool = hosts.open("a", proxy.url)
        c_repo, c_spool = hosts.open("c", moto.url)
        # A's link lets packs through and loses the manifest: its outage begins between them.
        proxy.refuse = lambda method, path: method == "PUT" and "/manifests/" in path
        first = a_repo.commit("w", image(tmp_path / "img", 2))
        deadline = time.monotonic() + 60
        while proxy.refused == 0 or not all(
            any(p in k for k in moto.keys(bucket, "ckpt/wpacks/w/")) for p in first.packs
        ):
            assert time.monotonic() < deadline, "A's packs never reached the bucket alone"
            time.sleep(0.2)
        proxy.refuse = lambda method, path: True  # now all of A's link is down
        with pytest.raises(TransientStorageError):
            a_repo.checkpoints("w")  # a listing is the bucket's or an error, never the cache's
        assert [i.id for i in a_repo.checkpoints_local("w")] == [first.id]  # said as partial
        time.sleep(GRACE + 0.5)
        gc = collect_garbage(c_repo, ["w"])  # C finds A's packs old and unreferenced
        assert set(first.packs) <= set(gc.deleted_packs)
        assert c_spool.wait_uploaded(60)  # its deletes are done in the bucket

        proxy.refuse = lambda method, path: False  # A is back
        a_spool.mark_online()
        assert a_spool.wait_uploaded(90)
        assert restorable_everywhere(hosts, "w") == [first.id]

        # A's next commit of pages it had already stored reuses them only where the bucket
        # still has them.
        again = image(tmp_path / "img2", 2)
        os.rename(again / "core-1.img", again / "core-2.img")
        second = a_repo.commit("w", again)
        assert a_spool.wait_uploaded(60)
        assert restorable_everywhere(hosts, "w") == sorted([first.id, second.id])
        assert second.new_bytes < first.new_bytes / 2  # what the bucket has is still deduped
    finally:
        proxy.close()


_SPOOLING_HOST = """
import sys, time
from pathlib import Path
from checkpointer.repository.stack import open_repository
from tests.support import s3_repository_config
state, key, url, bucket, *images = sys.argv[1:]
repo, spool = open_repository(s3_repository_config(Path(state), Path(key), url, bucket))
print(" ".join(repo.commit("w", Path(i)).id for i in images), flush=True)
time.sleep(600)  # killed -9 here, its uploads still queued
"""


def test_a_host_killed_with_uploads_queued_uploads_them_in_order_when_it_starts_again(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    c_repo, _ = hosts.open("c", moto.url)  # creates the repository
    proxy = S3Proxy(moto.url)
    try:
        proxy.refuse = lambda method, path: method == "PUT"  # A's uploads fail
        first, second = image(tmp_path / "one", 3), image(tmp_path / "two", 4)
        a = subprocess.Popen(
            [sys.executable, "-c", _SPOOLING_HOST, str(tmp_path / "a"),
             str(tmp_path / "repository.key"), proxy.url, bucket, str(first), str(second)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **S3_ENV},
        )  # fmt: skip
        try:
            assert a.stdout is not None
            ids = a.stdout.readline().split()
        finally:
            a.kill()
            a.wait()
        assert len(ids) == 2 and not moto.keys(bucket, "ckpt/manifests/")
        proxy.refuse = lambda method, path: False
        _, a_spool = hosts.open("a", proxy.url)  # A starts again
        assert a_spool.wait_uploaded(90)
        assert restorable_everywhere(hosts, "w") == sorted(ids)
        assert [i.id for i in c_repo.checkpoints("w")] == sorted(ids, reverse=True)
    finally:
        proxy.close()


def test_a_removed_checkpoints_own_packs_are_never_referenced_again(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    """Retention removes X: the packs only X referenced leave the workload's index at once,
    so no later commit references them, and another host's GC may delete them at any moment
    (before, the commit after a removal reused them until the next index refresh)."""
    a_repo, a_spool = hosts.open("a", moto.url)
    old = a_repo.commit("w", image(tmp_path / "old", 5))
    a_repo.commit("w", image(tmp_path / "new", 6))
    a_repo.delete("w", old.id)
    again = a_repo.commit("w", image(tmp_path / "again", 5))  # X's pages, once more
    assert not set(again.packs) & set(old.packs) and again.new_bytes > 0
    assert a_spool.wait_uploaded(60)
    assert len(restorable_everywhere(hosts, "w")) == 2  # the newer one, and `again`
