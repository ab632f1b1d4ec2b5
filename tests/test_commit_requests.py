"""What a commit asks of the bucket in a fleet (issue 27): no listing, the head read once and
written once (retention's drop rides on the commit's own head write), besides the pack, its
index and the manifest; and what retention drops is deleted only by the owner's hourly job,
no sooner than the grace period after the drop, and never while pinned.

The host is the daemon's own storage stack in fleet mode (`open_repository`: spool, retrying,
S3 on a real moto_server over HTTP), its requests counted at the wire by a proxy; retention
and the hourly job are the engine's (`Maintenance`). Before this version a commit with
retention listed `manifests/<w>/`, `pins/<w>/` and `marks/<w>/` and read the head ~5 times;
the pin test failed there too: retention deleted the manifest at the drop, so the pin that
came after it found no checkpoint."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.config import Retention
from checkpointer.engine.events import Silent
from checkpointer.engine.maintenance import Maintenance
from checkpointer.repository.stack import open_repository
from storage import Repository
from storage.backends.spooled import SpooledBlobStore
from storage.keys import head_key
from tests.support import S3_ENV, Moto, s3_repository_config
from tests.support.wire import Wire

GRACE = 3.0
Host = tuple[Repository, SpooledBlobStore, Maintenance]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SpooledBlobStore]]:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    spools: list[SpooledBlobStore] = []
    yield spools
    for spool in spools:
        spool.close()


def fleet_host(
    opened: list[SpooledBlobStore], tmp_path: Path, name: str, url: str, bucket: str
) -> Host:
    config = s3_repository_config(tmp_path / name, tmp_path / "repository.key", url, bucket)
    config.fleet.enabled = True
    config.storage.gc_grace = GRACE
    repo, spool = open_repository(config)
    assert spool is not None and repo.fencing is not None
    opened.append(spool)
    return repo, spool, Maintenance(repo, Silent(), spool, 1 << 40, owned=lambda: ["w"])


def checkpoint(host: Host, folder: Path, seed: int, policy: Retention) -> str:
    """engine.checkpoint's storage part: the commit, then retention, then the uploads."""
    repo, spool, maintenance = host
    folder.mkdir(parents=True)
    (folder / "pages-1.img").write_bytes(random.Random(seed).randbytes(64 * 1024))
    cid = repo.commit("w", folder).id
    maintenance.apply_retention("w", policy, [])
    assert spool.wait_uploaded(60)
    return cid


def ids(repo: Repository) -> list[str]:
    return [c.id for c in repo.checkpoints("w")]


def manifests(moto: Moto, bucket: str) -> set[str]:
    return {
        k.rsplit("/", 1)[-1].removesuffix(".json") for k in moto.keys(bucket, "ckpt/manifests/w/")
    }


def test_a_commit_lists_nothing_and_reads_and_writes_the_head_once(
    tmp_path: Path, moto: Moto, bucket: str, opened: list[SpooledBlobStore]
) -> None:
    wire = Wire(moto)
    try:
        host = fleet_host(opened, tmp_path, "a", wire.url, bucket)
        repo = host[0]
        repo.fence("w", 1)
        keep = Retention(keep_last=2)
        made = [checkpoint(host, tmp_path / f"{i}", i, keep) for i in range(3)]  # warmed up
        wire.seen.clear()
        made += [checkpoint(host, tmp_path / f"{i}", i, keep) for i in range(3, 6)]
        head = f"ckpt/{head_key('w')}"
        assert [p for m, p in wire.seen if m == "LIST"] == []
        assert sum(1 for m, k in wire.seen if m == "GET" and k == head) == 3
        assert sum(1 for m, k in wire.seen if m == "PUT" and k == head) == 3
        assert ids(repo) == made[:-3:-1]  # retention kept the 2 newest ...
        # ... and the head dropped the others, their manifests still there for a reader
        # who read the head just before: within the grace, the owner's job deletes nothing.
        host[2].collect_garbage()
        assert manifests(moto, bucket) >= set(made)
        time.sleep(GRACE + 0.5)
        host[2].collect_garbage()
        assert host[1].wait_uploaded(60)
        assert manifests(moto, bucket) == set(made[-2:])
        for cid in ids(repo):
            repo.verify("w", cid)
    finally:
        wire.proxy.close()


def test_a_checkpoint_dropped_from_the_head_whose_pin_came_within_grace_is_not_deleted(
    tmp_path: Path, moto: Moto, bucket: str, opened: list[SpooledBlobStore]
) -> None:
    a = fleet_host(opened, tmp_path, "a", moto.url, bucket)  # the owner
    b = fleet_host(opened, tmp_path, "b", moto.url, bucket)  # another host, for `pin`
    a[0].fence("w", 1)
    keep = Retention(keep_last=1)
    c1 = checkpoint(a, tmp_path / "1", 1, keep)
    c2 = checkpoint(a, tmp_path / "2", 2, keep)  # retention drops c1 from the head ...
    assert ids(a[0]) == [c2]
    b[0].pin("w", c1)  # ... then, within the grace, it is pinned elsewhere
    assert b[1].wait_uploaded(60)
    c3 = checkpoint(a, tmp_path / "3", 3, keep)  # the owner's view has no pin: c2 dropped
    assert ids(a[0]) == [c3]
    time.sleep(GRACE + 0.5)
    a[2].collect_garbage()  # the owner's job, past the grace: lists pins first
    assert a[1].wait_uploaded(60)
    assert manifests(moto, bucket) == {c1, c3}  # c2 went, the pinned c1 did not ...
    assert ids(a[0]) == [c3, c1] == ids(b[0])  # ... and is named again, restorable anywhere
    b[0].verify("w", c1)
