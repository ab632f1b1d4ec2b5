"""Garbage collection on one host never deletes what another host's checkpoint needs.

Two Repository objects on one bucket (a real moto_server over HTTP) play two hosts: no lock is
shared between them, only the bucket."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest

from storage import Repository, keys
from storage.backends.base import BlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.backends.wrapper import WrappedBlobStore
from storage.gc import collect_garbage
from tests.support import S3_ENV, Moto

T = TypeVar("T")


def bucket_store(moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    return S3BlobStore(
        S3Settings(bucket=bucket, prefix="ckpt", endpoint_url=moto.url, region="us-east-1")
    )


class LateUploads(WrappedBlobStore):
    """Host A behind an outage: its packs reach the bucket `delay` s after they were named
    (they waited in its spool), and its manifest is held until released."""

    def __init__(self, inner: BlobStore, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.holding = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith(keys.WPACKS):
            time.sleep(self.delay)
        if key.startswith(keys.MANIFESTS):
            self.holding.set()
            self.release.wait(60)
        self.inner.put(key, data)

    def put_pieces(self, key: str, pieces: Callable[[], Iterable[bytes | memoryview]]) -> None:
        self.put(key, b"".join(pieces()))  # the manifest comes this way

    def around(self, op: str, fn: Callable[[], T]) -> T:
        return fn()


def test_packs_uploaded_late_are_young_to_another_hosts_gc(
    tmp_path: Path, moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = bucket_store(moto, bucket, monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(1024 * 1024))
    late = LateUploads(store, delay=4.0)
    host_a = Repository(late, gc_grace=3600)
    done: list[str] = []
    writer = threading.Thread(target=lambda: done.append(host_a.commit("web", src).id))
    writer.start()
    assert late.holding.wait(60)  # A's packs are up, named 4 s ago; its manifest is next
    report = collect_garbage(Repository(store, gc_grace=2.5), ["web"])  # B, grace shorter
    assert report.deleted_packs == [] and report.kept_young >= 1
    late.release.set()
    writer.join(60)
    Repository(store).verify("web", done[0])  # A's checkpoint is whole


def test_a_pack_collected_by_another_host_is_never_referenced_again(
    tmp_path: Path, moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = bucket_store(moto, bucket, monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(512 * 1024))
    host_a = Repository(store, gc_grace=2.0)
    first = host_a.commit("web", src)
    time.sleep(2.5)  # its packs are past the grace period
    host_b = Repository(store, gc_grace=2.0)
    host_b.delete("web", first.id)  # B's retention removes it, B's GC its packs
    assert collect_garbage(host_b, ["web"]).deleted_packs == sorted(first.packs)
    # A's chunk index still knows those packs: the commit that would reference them finds
    # them gone before its manifest is written, forgets them and stores the chunks again.
    again = host_a.commit("web", src)
    assert again.new_bytes > 0 and not set(again.packs) & set(first.packs)
    assert [c.id for c in host_a.checkpoints("web")] == [again.id]
    host_a.verify("web", again.id)
    # A later refresh of the index does not bring the deleted packs back either.
    host_a.dedup.expire()
    third = host_a.commit("web", src)
    assert set(third.packs) <= set(again.packs)
    host_a.verify("web", third.id)


def test_a_manifest_that_cannot_be_read_stops_garbage_collection_of_its_workload(
    tmp_path: Path,
) -> None:
    from storage.backends import LocalBlobStore
    from storage.keys import manifest_key
    from storage.manifest import new_checkpoint_id

    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository(store, gc_grace=0)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(64 * 1024))
    kept = repo.commit("web", src)
    (src / "pages-1.img").write_bytes(os.urandom(64 * 1024))
    gone = repo.commit("web", src)  # removed: its own pack is unreferenced now
    repo.delete("web", gone.id)
    other = repo.commit("other", src)
    repo.delete("other", other.id)
    # a manifest of a newer format, or damaged: the packs it names are unknown
    store.put(manifest_key("web", new_checkpoint_id()), b'{"version": 99}')
    report = collect_garbage(repo, ["web", "other"])
    assert report.workloads == ["other"] and sorted(report.deleted_packs) == sorted(other.packs)
    assert list(report.skipped) == ["web"] and "cannot be read" in (report.problem() or "")
    assert set(gone.packs) - set(kept.packs) <= {
        n.id for k in store.list(keys.wpacks_of("web")) if (n := keys.parse(k))
    }  # nothing of web deleted
    repo.verify("web", kept.id)


def test_prune_without_a_name_leaves_other_hosts_workloads_alone(workdir: Path) -> None:
    import sys

    from tests.support import COUNTER, Daemon, free_port, serve

    shared = workdir / "shared-repository"
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    a = Daemon(workdir / "a", f"storage:\n  path: {shared}\n")
    b = Daemon(
        workdir / "b", f"storage:\n  path: {shared}\nretention:\n  keep_last: 1\n", a.key_file
    )
    port = free_port()
    try:
        a.start()
        a.cli("run", "web", "--keep-last", "5", "--", sys.executable, str(COUNTER), str(port))
        for _ in range(3):
            serve(port, 1)
            a.checkpoint("web")
        b.start()
        b.cli("prune")  # B's retention (keep 1) is not A's to apply
        assert len(a.json("list", "web")) == 3
    finally:
        a.stop()
        b.stop()
