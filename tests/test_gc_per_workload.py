"""Garbage collection per workload, by its owner (docs/fleet.md, R3; issue 27): a host's GC
lists only its own workloads' prefixes and reads only their manifests, never deletes another
host's packs, and the legacy flat layout of repositories written before packs belonged to a
workload is still restored, verified and rebuilt, and collected once nothing references it.

Every host is the daemon's own storage stack on a real moto_server over HTTP
(tests/support/storage_hosts.py); a host's requests are counted at the wire, by an HTTP proxy
between it and the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.backends.spooled import SpooledBlobStore
from storage.gc import collect_garbage
from storage.keys import manifest_key
from storage.manifest import new_checkpoint_id
from tests.support import ROOT, S3_ENV, Moto
from tests.support.legacy_layout import to_legacy_layout
from tests.support.storage_hosts import GRACE, StorageHosts, bucket_tool, image
from tests.support.storage_hosts import restorable_everywhere as restorable
from tests.support.wire import Wire


@pytest.fixture
def hosts(tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageHosts]:
    """The storage stacks of hosts sharing the bucket, opened on demand."""
    from tests.support.storage_hosts import storage_hosts

    yield from storage_hosts(tmp_path, bucket, monkeypatch)


def settled(*spools: SpooledBlobStore) -> None:
    """Everything these hosts queued (uploads, GC's deletes) is done in the bucket."""
    for spool in spools:
        assert spool.wait_uploaded(60)


def test_each_hosts_gc_lists_only_its_own_workloads_and_never_deletes_anothers_packs(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    wa, wb = Wire(moto), Wire(moto)
    try:
        a_repo, a_spool = hosts.open("a", wa.url)  # owns "wa"
        b_repo, b_spool = hosts.open("b", wb.url)  # owns "wb"
        removed = {}
        for repo, w, seed in ((a_repo, "wa", 1), (b_repo, "wb", 2)):
            old = repo.commit(w, image(tmp_path / f"{w}-old", seed, mb=2))
            repo.commit(w, image(tmp_path / f"{w}-new", seed + 10, mb=2))
            repo.delete(w, old.id)  # its retention: the old checkpoint's packs are garbage
            removed[w] = old
        settled(a_spool, b_spool)
        time.sleep(GRACE + 0.5)
        b_garbage = set(moto.keys(bucket, "ckpt/wpacks/wb/"))

        wa.seen.clear()
        report = collect_garbage(a_repo, ["wa"])
        settled(a_spool)
        assert sorted(report.deleted_packs) == sorted(removed["wa"].packs)
        assert report.workloads == ["wa"] and report.legacy_deleted == 0
        # Its own manifests and packs, and once the legacy flat layout (found empty)...
        assert wa.lists() == ["ckpt/manifests/wa/", "ckpt/packs/", "ckpt/wpacks/wa/"]
        assert all(
            k.startswith(("ckpt/manifests/wa/", "ckpt/wpacks/wa/")) for k in wa.keys_touched()
        )
        assert set(moto.keys(bucket, "ckpt/wpacks/wb/")) == b_garbage  # ... B's are B's

        # ... never again, and nothing of it grows with B's workloads.
        wa.seen.clear()
        assert collect_garbage(a_repo, ["wa"]).deleted_packs == []
        assert wa.lists() == ["ckpt/manifests/wa/", "ckpt/wpacks/wa/"]
        before = sorted(wa.seen)
        for i in range(5):
            b_repo.commit(f"wb{i}", image(tmp_path / f"wb{i}", 20 + i, mb=1))
        settled(b_spool)
        wa.seen.clear()
        collect_garbage(a_repo, ["wa"])
        assert sorted(wa.seen) == before

        report = collect_garbage(b_repo, ["wb"])  # B collects its own, once
        settled(b_spool)
        assert sorted(report.deleted_packs) == sorted(removed["wb"].packs)
        assert len(restorable(hosts, "wa")) == len(restorable(hosts, "wb"))
    finally:
        wa.proxy.close()
        wb.proxy.close()


def test_a_legacy_repository_is_restored_after_the_upgrade_and_its_flat_packs_collected(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    a_repo, a_spool = hosts.open("a", moto.url)
    one, two = image(tmp_path / "one", 1, mb=2), image(tmp_path / "two", 2, mb=2)
    first, second = a_repo.commit("web", one), a_repo.commit("web", two)
    settled(a_spool)
    a_spool.close()
    del hosts["a"]
    # The bucket as an earlier version left it: flat packs, manifests of format 2; and the
    # checkpoint of a workload "old" sharing web's first packs (dedup was repository-wide).
    tool = bucket_tool(moto.url, bucket, tmp_path / "repository.key")
    to_legacy_layout(tool, "web")
    shared = tool.read_manifest("web", first.id)
    shared.workload, shared.id = "old", new_checkpoint_id()
    key = manifest_key("old", shared.id)
    tool.backend.put_pieces(key, lambda: tool.codec.seal_stream(key, shared.pieces()))
    flat = set(moto.keys(bucket, "ckpt/packs/"))
    assert len(flat) == 2 * len(set(first.packs) | set(second.packs))
    assert not moto.keys(bucket, "ckpt/wpacks/")

    b_repo, b_spool = hosts.open("b", moto.url)  # the upgraded host
    assert [i.id for i in b_repo.checkpoints("web")] == [second.id, first.id]
    b_repo.materialize("web", second.id, tmp_path / "out")
    assert (tmp_path / "out" / "pages-1.img").read_bytes() == (two / "pages-1.img").read_bytes()
    b_repo.verify("web", first.id)
    b_repo.verify("old", shared.id)
    # Its next commit of the very same pages stores them again, under the workload's prefix:
    # flat packs are never reused (one full upload per workload after the upgrade).
    third = b_repo.commit("web", two)
    assert third.pack_home == "web" and third.new_chunks == third.total_chunks
    assert not set(third.packs) & (set(first.packs) | set(second.packs))

    b_repo.delete("web", first.id)
    b_repo.delete("web", second.id)
    settled(b_spool)
    time.sleep(GRACE + 0.5)
    report = collect_garbage(b_repo, ["web"])
    settled(b_spool)
    # second's flat packs go; first's stay: the legacy checkpoint of "old" references them
    assert sorted(report.deleted_packs) == sorted(second.packs)
    assert report.legacy_deleted == len(second.packs)
    assert len(moto.keys(bucket, "ckpt/packs/")) == 2 * len(first.packs)
    b_repo.verify("old", shared.id)
    b_repo.delete("old", shared.id)
    settled(b_spool)
    assert collect_garbage(b_repo, ["web"]).legacy_deleted == len(first.packs)
    settled(b_spool)
    assert not moto.keys(bucket, "ckpt/packs/") and not b_repo.flat_layout_empty
    collect_garbage(b_repo, ["web"])
    assert b_repo.flat_layout_empty  # found empty: the legacy pass is over for this process
    assert restorable(hosts, "web") == [third.id]


_COMMITTING_HOST = """
import sys
from pathlib import Path
from checkpointer.repository.stack import open_repository
from tests.support import s3_repository_config
state, key, url, bucket, image = sys.argv[1:]
repo, spool = open_repository(s3_repository_config(Path(state), Path(key), url, bucket))
repo.commit("w", Path(image))
print("committed", flush=True)
"""


def queued(state: Path) -> list[str]:
    """The operations a host's spool holds, as queued ("P key"), oldest first."""
    folder = state / "cache" / "queue"
    out = []
    for p in sorted(folder.iterdir() if folder.exists() else []):
        if not p.name.isdigit():
            continue  # uploaded (.up), or being written (.tmp)
        try:
            out.append(p.read_text())
        except FileNotFoundError:
            continue  # uploaded meanwhile
    return out


def test_a_host_killed_mid_commit_leaves_nothing_gc_keeps_forever(
    tmp_path: Path, moto: Moto, bucket: str, hosts: StorageHosts
) -> None:
    hosts.open("c", moto.url)  # creates the repository (and its key)
    big = image(tmp_path / "big", 7, mb=96)
    a = subprocess.Popen(
        [sys.executable, "-c", _COMMITTING_HOST, str(tmp_path / "a"),
         str(tmp_path / "repository.key"), moto.url, bucket, str(big)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **S3_ENV},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sum(op.startswith("P wpacks/w/") for op in queued(tmp_path / "a")) < 4:
            assert a.poll() is None, "the commit finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        a.kill()
        out, _ = a.communicate()
    assert "committed" not in out
    assert not any(op.startswith("P manifests/") for op in queued(tmp_path / "a"))
    assert not moto.keys(bucket, "ckpt/manifests/")  # it died mid-checkpoint

    a_repo, a_spool = hosts.open("a", moto.url)  # A starts again: its queued packs go up
    settled(a_spool)
    orphans = set(moto.keys(bucket, "ckpt/wpacks/w/"))
    assert orphans
    kept = a_repo.commit("w", image(tmp_path / "small", 8, mb=1))
    settled(a_spool)
    time.sleep(GRACE + 0.5)
    report = collect_garbage(a_repo, ["w"])
    settled(a_spool)
    assert not set(report.deleted_packs) & set(kept.packs)
    left = set(moto.keys(bucket, "ckpt/wpacks/w/"))
    assert len(left) == 2 * len(kept.packs) and not left & orphans  # every orphan gone
    assert restorable(hosts, "w") == [kept.id]
