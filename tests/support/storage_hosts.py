"""Hosts of one bucket without a daemon: each is the daemon's own storage stack
(`open_repository`: spool and cache, retrying, S3 on a real moto_server over HTTP) with a
state folder of its own, so no lock is shared between them, only the bucket. Garbage
collection runs with a grace of a few seconds, so that it really deletes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.repository.key import read_secret_file
from checkpointer.repository.stack import open_repository
from storage import Repository, keyring
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.backends.spooled import SpooledBlobStore
from tests.support.moto_server import S3_ENV, s3_repository_config

GRACE = 2.0

StorageHost = tuple[Repository, SpooledBlobStore]


class StorageHosts(dict[str, StorageHost]):
    """Hosts opened on demand by name, closed together (a test's fixture closes them). All
    share the access key `tmp_path / "repository.key"` (made by the first one opened)."""

    def __init__(self, tmp_path: Path, bucket: str) -> None:
        super().__init__()
        self.tmp_path = tmp_path
        self.bucket = bucket

    def open(self, name: str, url: str, grace: float = GRACE) -> StorageHost:
        """Host `name` (state folder tmp_path/name), reaching the bucket at `url` (moto's,
        or a proxy's in front of it)."""
        config = s3_repository_config(
            self.tmp_path / name, self.tmp_path / "repository.key", url, self.bucket
        )
        config.storage.gc_grace = grace
        repo, spool = open_repository(config)
        assert spool is not None
        self[name] = (repo, spool)
        return repo, spool

    def close(self) -> None:
        for _, spool in self.values():
            spool.close()


def bucket_tool(url: str, bucket: str, key_file: Path) -> Repository:
    """The bucket's repository as a tool writing straight to it (no spool), opened with the
    hosts' access key: to plant what another version wrote. The S3 credentials must be set."""
    settings = S3Settings(
        bucket=bucket, prefix="ckpt", endpoint_url=url, region="us-east-1", addressing_style="path"
    )
    store = RetryingBlobStore(S3BlobStore(settings), attempts=2)
    secret = read_secret_file(key_file, "key file")
    return Repository(store, codec=keyring.open_repository_codec(store, secret, "tool").codec)


def storage_hosts(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StorageHosts]:
    """The body of a `hosts` fixture: the S3 credentials set, the hosts closed at the end."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    opened = StorageHosts(tmp_path, bucket)
    try:
        yield opened
    finally:
        opened.close()


def image(folder: Path, seed: int, mb: int = 6) -> Path:
    """A checkpoint-like folder of incompressible pages (several packs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    (folder / "pages-1.img").write_bytes(rnd.randbytes(mb * 1024 * 1024))
    (folder / "core-1.img").write_bytes(rnd.randbytes(3000))
    return folder


def restorable_everywhere(hosts: dict[str, StorageHost], workload: str) -> list[str]:
    """Every checkpoint any host lists verifies from the bucket; the ids listed."""
    listed: set[str] = set()
    for repo, _ in hosts.values():
        for info in repo.checkpoints(workload):
            repo.verify(workload, info.id)
            listed.add(info.id)
    return sorted(listed)
