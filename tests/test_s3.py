"""Checkpoints in S3-compatible storage: a real moto_server over HTTP, the production path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpointer.criu.images.memory import changed_page_bytes
from checkpointer.repository.key import read_secret_file
from storage import Repository, keyring
from storage import keys as keys_mod
from storage.backends.base import BlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.crypto import Sealed, new_master
from storage.errors import StorageAccessError
from storage.file_reader import CheckpointFiles
from storage.gc import collect_garbage
from storage.keys import pack_key
from tests.support import (
    CLI,
    PROGRAMS,
    ROOT,
    S3_ENV,
    Daemon,
    Moto,
    free_port,
    http_get,
    kill_tree,
    redis_client,
    redis_command,
    s3_config,
)

BALLAST = str(PROGRAMS / "ballast_server.py")


def s3_daemon(
    base: Path, moto: Moto, bucket: str, extra: str = "", key_file: Path | None = None
) -> Daemon:
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon(base, s3_config(moto, bucket, extra), key_file)
    d.env.update(S3_ENV)
    return d


def settings(moto: Moto, bucket: str) -> S3Settings:
    return S3Settings(
        bucket=bucket,
        prefix="ckpt",
        endpoint_url=moto.url,
        region="us-east-1",
        addressing_style="path",
        access_key_id="testing",
        secret_access_key="testing",
    )


def repository(moto: Moto, bucket: str, key_file: Path | None = None) -> Repository:
    """The bucket's repository, opened with `key_file` (a daemon's) or in clear."""
    store = RetryingBlobStore(S3BlobStore(settings(moto, bucket)), attempts=2)
    if key_file is None:
        return Repository(store)
    secret = read_secret_file(key_file, "key file")
    return Repository(store, codec=keyring.open_repository_codec(store, secret, "t").codec)


def assert_no_partial_checkpoint(moto: Moto, bucket: str, key_file: Path) -> None:
    """Every manifest in the bucket names only packs (and indexes) that are there."""
    repo = repository(moto, bucket, key_file)
    keys = set(moto.keys(bucket, "ckpt/"))
    names = repo.workloads()
    assert names
    for name in names:
        infos = repo.checkpoints(name)
        assert len(infos) == len(repo.manifest_names(keys_mod.manifests_of(name)))  # all open
        for info in infos:
            m = repo.read_manifest(name, info.id)
            for pack in m.packs:
                assert f"ckpt/{keys_mod.pack_key(pack, m.pack_home)}" in keys
                assert f"ckpt/{keys_mod.index_key(pack, m.pack_home)}" in keys


def test_restore_on_another_host_with_an_empty_cache(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    port = free_port()
    a = s3_daemon(workdir / "host-a", moto, bucket)
    b = s3_daemon(workdir / "host-b", moto, bucket, key_file=a.key_file)
    try:
        a.start()
        a.cli("run", "web", "--no-auto-restore", "--", sys.executable, BALLAST, str(port), "16")
        for _ in range(5):
            http_get(port)
        cid = a.checkpoint("web")
        moto.wait_for_checkpoint(bucket, cid)
        keys = moto.keys(bucket, "ckpt/")
        assert f"ckpt/manifests/web/{cid}.json" in keys
        assert any(k.endswith(".pack") for k in keys) and any(k.endswith(".idx") for k in keys)
        kill_tree(a.pid("web"))
        a.stop()
        b.start()  # another host: its cache folder is empty
        assert not list((b.state / "cache" / "blobs").rglob("*.pack"))
        assert [c["id"] for c in b.json("list", "web")] == [cid]
        b.cli("restore", "web")
        assert http_get(port) == "6"
        assert b.json("verify", "web")["ok"]
    finally:
        a.stop()
        b.stop()


def test_dedup_idle_workload_second_checkpoint_stores_little(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    port = free_port()
    d = s3_daemon(workdir, moto, bucket)
    try:
        d.start()
        d.cli("run", "idle", "--", sys.executable, BALLAST, str(port), "32")
        http_get(port)
        first = d.json("checkpoint", "idle")
        second = d.json("checkpoint", "idle")
        assert first["new_bytes"] > 32 * 1024 * 1024 * 0.9
        assert second["new_bytes"] < 0.10 * first["new_bytes"], (first, second)
    finally:
        d.stop()


def test_dedup_redis_one_percent_rewritten(workdir: Path, moto: Moto, bucket: str) -> None:
    port = free_port()
    d = s3_daemon(workdir, moto, bucket)
    try:
        d.start()
        d.cli("run", "cache", "--no-auto-restore", "--", *redis_command(port))
        client = redis_client(port)
        n = 100_000
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.set(f"key:{i}", f"{i:08d}" * 12)
        pipe.execute()
        client.close()
        first = d.json("checkpoint", "cache")
        client = redis_client(port)
        pipe = client.pipeline(transaction=False)
        for i in range(0, n, 100):  # 1% of the keys, spread over the whole key space
            pipe.set(f"key:{i}", f"{i + 1:08d}" * 12)
        pipe.execute()
        client.close()
        second = d.json("checkpoint", "cache")
        repo = repository(moto, bucket, d.key_file)
        moto.wait_for_checkpoint(bucket, second["id"])
        repo.materialize("cache", first["id"], workdir / "one")
        repo.materialize("cache", second["id"], workdir / "two")
        floor = changed_page_bytes(workdir / "one", workdir / "two")
        assert floor > 0
        print(
            f"\nredis 1%: image {second['size_bytes']} B, pages changed {floor} B, "
            f"stored {second['new_bytes']} B ({second['new_bytes'] / floor:.2f} x floor)"
        )
        assert second["new_bytes"] <= 1.5 * floor
    finally:
        d.stop()


def test_outage_mid_upload_spools_then_uploads_and_restores_from_cache(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    port = free_port()
    d = s3_daemon(workdir, moto, bucket)
    try:
        d.start()
        d.cli("run", "big", "--no-auto-restore", "--", sys.executable, BALLAST, str(port), "48")
        http_get(port)
        before = d.checkpoint("big")
        moto.wait_for_checkpoint(bucket, before)
        for _ in range(3):
            http_get(port, timeout=5)  # count 4
        for _ in range(40):
            http_get(port, path="/touch")  # rewrite 40 pages of the ballast: count 44
        newer = d.json("checkpoint", "big")
        moto.pause()  # the server stops while the new checkpoint is uploading
        try:
            time.sleep(1)
            # The checkpoint is committed locally: listed, and restorable from the cache.
            assert newer["id"] in [c["id"] for c in d.json("list", "big")]
            kill_tree(d.pid("big"))
            d.cli("restore", "big")
            assert http_get(port) == "45"
            # Another checkpoint during the outage goes to the spool too.
            during = d.checkpoint("big")
        finally:
            moto.resume()
        # Once the server is back, both reach the bucket, in order, never half visible.
        deadline = time.monotonic() + 90
        while True:
            assert_no_partial_checkpoint(moto, bucket, d.key_file)
            keys = moto.keys(bucket, "ckpt/manifests/big/")
            if any(during in k for k in keys):
                break
            assert time.monotonic() < deadline, d.log.read_text()[-3000:]
            time.sleep(0.3)
        assert any(newer["id"] in k for k in keys)
        assert "unreachable" in d.log.read_text()
        repo = repository(moto, bucket, d.key_file)
        repo.verify("big", during)  # what was uploaded after the outage is whole
    finally:
        d.stop()


def test_missing_bucket_is_one_clear_error(workdir: Path, moto: Moto) -> None:
    d = s3_daemon(workdir, moto, "no-such-bucket")
    t0 = time.monotonic()
    r = subprocess.run(
        [*CLI, "daemon", "--config", str(d.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **S3_ENV},
        timeout=60,
    )
    assert r.returncode == 1
    assert "bucket 'no-such-bucket' does not exist" in r.stderr and "Traceback" not in r.stderr
    assert "retrying" not in r.stderr and time.monotonic() - t0 < 15


def test_bad_credentials_are_one_clear_error_without_retries(workdir: Path) -> None:
    strict = Moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks every key it gets
    try:
        d = s3_daemon(workdir, strict, "any-bucket")
        t0 = time.monotonic()
        env = {**os.environ, **S3_ENV}
        r = subprocess.run(
            [*CLI, "daemon", "--config", str(d.config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
        )
        assert r.returncode == 1
        assert "refused access (InvalidAccessKeyId" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "retrying" not in r.stderr
        assert time.monotonic() - t0 < 15
    finally:
        strict.stop()


def test_access_errors_are_not_retried(moto: Moto) -> None:
    s = S3Settings(
        bucket="nope",
        endpoint_url=moto.url,
        region="us-east-1",
        addressing_style="path",
        access_key_id="testing",
        secret_access_key="testing",
    )
    store = RetryingBlobStore(S3BlobStore(s), attempts=5)
    with pytest.raises(StorageAccessError):
        store.put("x", b"y")
    assert store.retries == 0


def test_multipart_upload_round_trip_and_abort_leftovers(moto: Moto, bucket: str) -> None:
    s = S3Settings(
        bucket=bucket,
        prefix="mp",
        endpoint_url=moto.url,
        region="us-east-1",
        addressing_style="path",
        access_key_id="testing",
        secret_access_key="testing",
        multipart_threshold=5 * 1024 * 1024,
        multipart_chunk=5 * 1024 * 1024,
    )
    store = S3BlobStore(s)
    data = bytes(range(256)) * (12 * 4096)  # 12 MiB: three parts
    store.put("big", data)
    assert store.get("big") == data
    store.client.create_multipart_upload(Bucket=bucket, Key="mp/left-behind")
    assert store.abort_incomplete_uploads() == 1
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


class _HoldManifests(BlobStore):
    """Lets packs through and holds manifest puts until released: a commit caught mid-way."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.holding = threading.Event()

    def put(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith(keys_mod.MANIFESTS):
            self.holding.set()
            self.release.wait(60)
        self.inner.put(key, data)

    def get(self, key: str, limit: int | None = None) -> bytes:
        return self.inner.get(key, limit)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str):  # type: ignore[no-untyped-def]
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_gc_racing_a_checkpoint_keeps_its_chunks(workdir: Path, moto: Moto, bucket: str) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(3 * 1024 * 1024))
    plain = repository(moto, bucket)
    held = _HoldManifests(plain.backend)
    writer_repo = Repository(held, gc_grace=3600)
    result: list[str] = []
    writer = threading.Thread(target=lambda: result.append(writer_repo.commit("w", src).id))
    writer.start()
    assert held.holding.wait(30)  # packs are up, the manifest is not
    # Another process (no shared lock) collects garbage: the young packs must stay.
    report = collect_garbage(Repository(plain.backend, gc_grace=3600), ["w"])
    assert report.deleted_packs == [] and report.kept_young >= 1
    # The same process with no grace at all: the lock makes GC wait for the commit.
    gc_done = threading.Event()
    gc_thread = threading.Thread(
        target=lambda: (collect_garbage(writer_repo, ["w"], grace=0), gc_done.set())
    )
    gc_thread.start()
    time.sleep(0.5)
    assert not gc_done.is_set()
    held.release.set()
    writer.join(30)
    gc_thread.join(30)
    assert gc_done.is_set() and result
    writer_repo.materialize("w", result[0], workdir / "out")
    assert (workdir / "out" / "pages-1.img").read_bytes() == (src / "pages-1.img").read_bytes()


def test_prune_deletes_manifests_then_unreferenced_packs(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    repo = repository(moto, bucket)
    repo.gc_grace = 0
    src = workdir / "src"
    src.mkdir()
    ids = []
    for _ in range(3):
        (src / "pages-1.img").write_bytes(os.urandom(256 * 1024))  # all new each time
        (src / "core.img").write_bytes(b"shared" * 1000)  # the same every time
        ids.append(repo.commit("w", src).id)
    packs_before = {k for k in moto.keys(bucket, "ckpt/wpacks/w/") if k.endswith(".pack")}
    assert len(packs_before) == 3
    # The middle checkpoint's pack holds only its own pages (the shared chunk dedups to the
    # first pack): retention removes its manifest, GC then its pack and index.
    repo.delete("w", ids[1])
    report = collect_garbage(repo, ["w"])
    packs_after = {k for k in moto.keys(bucket, "ckpt/wpacks/w/") if k.endswith(".pack")}
    assert len(report.deleted_packs) == 1 and packs_after < packs_before
    assert len(moto.keys(bucket, "ckpt/wpacks/w/")) == 2 * len(packs_after)  # no orphan index
    for cid in (ids[0], ids[2]):
        repo.verify("w", cid)  # everything still referenced is there


def test_full_spool_drops_the_oldest_unuploaded_checkpoint(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    port = free_port()
    d = s3_daemon(workdir, moto, bucket, "  spool_max_bytes: 24MiB\n")
    try:
        d.start()
        d.cli("run", "big", "--no-auto-restore", "--", sys.executable, BALLAST, str(port), "16")
        http_get(port)
        moto.pause()
        try:
            oldest = d.checkpoint("big")  # ~16 MiB waiting: fits
            http_get(port, path="/reshuffle")
            newest = d.checkpoint("big")  # another ~16 MiB: over 24 MiB, the oldest goes
            listed = [c["id"] for c in d.json("list", "big")]
            assert listed == [newest]
        finally:
            moto.resume()
        assert "dropped 1 checkpoint(s) never uploaded" in d.log.read_text()
        moto.wait_for_checkpoint(bucket, newest)
        time.sleep(1)
        keys = moto.keys(bucket, "ckpt/")
        assert not any(oldest in k for k in keys)
        assert_no_partial_checkpoint(moto, bucket, d.key_file)
        repository(moto, bucket, d.key_file).verify(
            "big", newest
        )  # packs it shares with the dropped one
    finally:
        d.stop()


def test_prune_dry_run_shows_each_checkpoint_with_its_rule(counter: tuple[Daemon, int]) -> None:
    d, _port = counter
    ids = [d.checkpoint("web") for _ in range(4)]
    d.cli("pin", "web", ids[0])
    r = d.json("prune", "web", "--dry-run")
    by_id = {c["id"]: c for c in r["checkpoints"]}
    assert r["dry_run"] and set(by_id) == set(ids)
    assert by_id[ids[0]]["action"] == "keep" and "pinned" in by_id[ids[0]]["reasons"]
    assert "latest good" in by_id[ids[3]]["reasons"] and "last" in by_id[ids[3]]["reasons"]
    assert len(d.json("list", "web")) == 4  # a dry run removes nothing
    human = d.cli("prune", "web", "--dry-run").stdout
    assert "keep" in human and "garbage collection: would remove" in human


def test_a_lazy_read_from_the_bucket_gets_a_segment_by_range(
    tmp_path: Path, moto: Moto, bucket: str
) -> None:
    """Through the production S3 path (Range GETs on moto_server): a page comes from the
    segment that holds it, the pack is never downloaded whole, and ranges past the end of a
    blob are empty, as a file's are."""
    fetched: list[int] = []

    class Counting(S3BlobStore):
        def get(self, key: str, limit: int | None = None) -> bytes:
            data = super().get(key, limit)
            fetched.append(len(data) * key.endswith(".pack"))
            return data

        def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
            data, size = super().get_range(key, offset, length)
            fetched.append(len(data) * key.endswith(".pack"))
            return data, size

    store = RetryingBlobStore(Counting(settings(moto, bucket)), attempts=2)
    repo = Repository(store, codec=Sealed(new_master()))
    src = tmp_path / "src"
    src.mkdir()
    pages = os.urandom(900 * 4096)
    (src / "pages-1.img").write_bytes(pages)
    m = repo.commit("w", src)
    fetched.clear()
    files = CheckpointFiles(repo, "w", m.id, repo.known_chunks("w"))
    assert files.read("pages-1.img", 800 * 4096, 4096) == pages[800 * 4096 : 801 * 4096]
    assert 0 < sum(fetched) < 3 * 65536
    key = pack_key(m.packs[0], m.pack_home)
    data, size = store.get_range(key, 10, 5)
    assert data == store.get(key)[10:15] and size > 15
    assert store.get_range(key, size + 10, 100) == (b"", size)
    assert store.get_range(key, size - 3, 100)[0] == store.get(key)[-3:]
