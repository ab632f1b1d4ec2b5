"""Upgrading over a repository an earlier version wrote (flat packs, manifests of format 2):
its checkpoints are restored by the real daemon with CRIU, their in-memory state intact; the
next checkpoint goes under the workload's own prefix; once retention removes the legacy ones,
`prune` collects their flat packs (storage/gc.py, the legacy pass)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import PROGRAMS, S3_ENV, Daemon, Moto, free_port, http_get, kill_tree, s3_config
from tests.support.legacy_layout import to_legacy_layout
from tests.support.storage_hosts import bucket_tool

BALLAST = str(PROGRAMS / "ballast_server.py")


def wait_for(what: str, ready: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_legacy_checkpoint_is_restored_with_its_state_and_its_packs_collected_later(
    workdir: Path, moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)  # for the tool that plants the legacy layout
    port = free_port()
    config = s3_config(moto, bucket, "retention:\n  keep_last: 1\n")
    config = config.replace("gc_grace: 1h", "gc_grace: 2s")
    (workdir / "old").mkdir()
    (workdir / "new").mkdir()
    old = Daemon(workdir / "old", config)  # the version before, on host A
    new = Daemon(workdir / "new", config, old.key_file)  # the upgraded one, on host B
    old.env.update(S3_ENV)
    new.env.update(S3_ENV)
    try:
        old.start()
        old.cli("run", "web", "--no-auto-restore", "--", sys.executable, BALLAST, str(port), "16")
        for _ in range(5):
            http_get(port)
        legacy = old.checkpoint("web")
        wait_for("the checkpoint reaches the bucket", lambda: moto.keys(bucket, "ckpt/manifests/"))
        kill_tree(old.pid("web"))
        old.stop()
        to_legacy_layout(bucket_tool(moto.url, bucket, old.key_file), "web")
        flat = moto.keys(bucket, "ckpt/packs/")
        assert flat and not moto.keys(bucket, "ckpt/wpacks/")

        new.start()
        new.cli("restore", "web")
        assert http_get(port) == "6"  # its memory, as the legacy checkpoint holds it
        assert new.json("verify", "web", legacy)["ok"]
        newer = new.checkpoint("web")  # keep_last 1: the legacy checkpoint is removed
        wait_for(
            "the new checkpoint in the bucket, the legacy one gone",
            lambda: (
                [k.rsplit("/", 1)[1] for k in moto.keys(bucket, "ckpt/manifests/")]
                == [f"{newer}.json"]
            ),
        )
        assert moto.keys(bucket, "ckpt/wpacks/web/")
        time.sleep(2.5)  # the flat packs are past gc_grace
        gc = new.json("prune")["gc"]
        assert gc["deleted_packs"] == len(flat) // 2  # a pack and its index each
        wait_for("the flat packs deleted", lambda: not moto.keys(bucket, "ckpt/packs/"))
        kill_tree(new.pid("web"))
        new.cli("restore", "web")
        assert http_get(port) == "7"  # from the checkpoint under the workload's prefix
    finally:
        old.stop()
        new.stop()
