"""Storage-side fencing: a workload's head names the checkpoints that exist, and a host that
lost the workload cannot add to it or take from it, in any later generation either.

Hosts are the daemon's own storage stack in fleet mode (`open_repository`: spool, retrying,
S3 on a real moto_server, heads written past the spool). Leases are not involved here: each
host is told its generation as the fleet would tell it (`fence`), including a stale one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.repository.stack import open_repository
from storage import Repository
from storage.backends.spooled import SpooledBlobStore
from storage.errors import CheckpointNotFound, CorruptCheckpoint
from storage.heads import Fenced, Head
from storage.keys import head_key
from tests.support import S3_ENV, Moto, s3_repository_config

Host = tuple[Repository, SpooledBlobStore]


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Host]]:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    opened: list[Host] = []
    yield opened
    for _, spool in opened:
        spool.close()


def fleet_host(opened: list[Host], tmp_path: Path, name: str, moto: Moto, bucket: str) -> Host:
    config = s3_repository_config(tmp_path / name, tmp_path / "repository.key", moto.url, bucket)
    config.fleet.enabled = True
    repo, spool = open_repository(config)
    assert spool is not None and repo.fencing is not None
    opened.append((repo, spool))
    return repo, spool


def image(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "pages-1.img").write_bytes(random.Random(seed).randbytes(256 * 1024))
    return folder


def ids(repo: Repository) -> list[str]:
    return [c.id for c in repo.checkpoints("w")]


def test_a_stale_owner_never_commits_nor_removes_across_three_generations(
    tmp_path: Path, moto: Moto, bucket: str, hosts: list[Host]
) -> None:
    a, a_spool = fleet_host(hosts, tmp_path, "a", moto, bucket)
    b, b_spool = fleet_host(hosts, tmp_path, "b", moto, bucket)
    a.fence("w", 1)
    c1 = a.commit("w", image(tmp_path / "1", 1)).id
    assert a_spool.wait_uploaded(60)

    b.fence("w", 2)  # B took the workload over; A does not know yet
    c2 = a.commit("w", image(tmp_path / "2", 2)).id  # A's manifest reaches the bucket ...
    assert a_spool.wait_uploaded(60)
    assert any(c2 in k for k in moto.keys(bucket, "ckpt/manifests/w/"))
    assert ids(b) == [c1]  # ... but the head never names it
    with pytest.raises(CheckpointNotFound, match="not committed"):
        b.materialize("w", c2, tmp_path / "out-b")  # `restore --checkpoint c2` there
    with pytest.raises(CheckpointNotFound, match="not committed"):
        b.verify("w", c2)  # was: checked the bucket's copy and said ok, restorable or not
    c3 = b.commit("w", image(tmp_path / "3", 3)).id
    assert b_spool.wait_uploaded(60)

    a.fence("w", 3)  # A takes it back: generation 3 knows nothing of c2 either
    assert ids(a) == [c3, c1]
    with pytest.raises(CheckpointNotFound, match="not committed"):
        a.require_committed("w", c2)  # A's own copy of it does not make it exist
    a.materialize("w", c3, tmp_path / "out-a")

    with pytest.raises(Fenced):
        b.delete("w", c3)  # B's retention, now stale, removes nothing
    assert ids(a) == [c3, c1]
    a.verify("w", c3)

    a.gc_grace = 0.0  # the owner's retention deletes the manifest no head names
    assert a.remove_strays("w") == [c2]
    assert a_spool.wait_uploaded(60)
    assert not any(c2 in k for k in moto.keys(bucket, "ckpt/manifests/w/"))
    assert ids(a) == [c3, c1]


def test_a_head_written_back_older_is_refused(
    tmp_path: Path, moto: Moto, bucket: str, hosts: list[Host]
) -> None:
    a, a_spool = fleet_host(hosts, tmp_path, "a", moto, bucket)
    a.fence("w", 1)
    a.commit("w", image(tmp_path / "1", 1))
    assert a_spool.wait_uploaded(60)
    old = moto.client().get_object(Bucket=bucket, Key=f"ckpt/{head_key('w')}")["Body"].read()
    a.fence("w", 2)
    assert a.fencing is not None
    moto.client().put_object(Bucket=bucket, Key=f"ckpt/{head_key('w')}", Body=old)  # replayed
    with pytest.raises(CorruptCheckpoint, match="went back to generation 1"):
        a.checkpoints("w")


def test_a_head_is_parsed_as_hostile_input() -> None:
    good = Head("w", 3, ("20261207T120000.000000Z-abcdef",), 4)
    assert Head.from_json(good.to_json(), "w") == good
    for raw in (
        b"[]",
        b'{"version": 1, "workload": "w", "generation": 1, "serial": 1, "chain": ["../x"]}',
        b'{"version": 1, "workload": "v", "generation": 1, "serial": 1, "chain": []}',
        b'{"version": 2}',
        b"not json",
    ):
        with pytest.raises(CorruptCheckpoint):
            Head.from_json(raw, "w")
