"""The encrypted repository: a bucket reader learns nothing, a bucket writer gets nothing run.

Real daemons, real CRIU, a real S3 endpoint (moto over HTTP) for the bucket-bytes test; the
tampering cases damage the repository folder the way someone with write access to it could.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from checkpointer.config import load_config
from checkpointer.repository.key import read_secret_file
from storage import Repository, keyring
from storage.backends import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.keys import index_key, manifest_key, pack_key
from tests.support import (
    CLI,
    COUNTER,
    PROGRAMS,
    ROOT,
    S3_ENV,
    Daemon,
    Moto,
    free_port,
    http_get,
    s3_config,
    serve,
)

MARKER_PROGRAM = PROGRAMS / "marker_holder.py"


def open_repo(d: Daemon) -> Repository:
    """The daemon's local repository, opened with its key (what a key holder can do)."""
    backend = LocalBlobStore(d.state / "repository")
    opened = keyring.open_repository_codec(
        backend, read_secret_file(d.key_file, "key file"), "test", create=False
    )
    return Repository(backend, codec=opened.codec)


def all_objects(moto: Moto, bucket: str) -> Iterator[tuple[str, bytes]]:
    s3 = moto.client()
    for key in moto.keys(bucket, ""):
        yield key, s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def decompressed(data: bytes) -> bytes:
    """Whatever zstd frames `data` holds, decompressed (b"" if it holds none). A pack holds
    its raw chunks first and its frames after them: the frames start at the first zstd magic
    from which they all decode (an earlier one may be chance bytes of a raw chunk)."""
    pos = data.find(ZSTD_MAGIC)
    while pos >= 0:
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data[pos:]), read_across_frames=True
            )
            return reader.read()
        except zstandard.ZstdError:
            pos = data.find(ZSTD_MAGIC, pos + 1)
    return b""


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize("encrypted", [True, False])
def test_bucket_holds_no_plaintext_of_the_workloads_memory(
    workdir: Path, moto: Moto, bucket: str, encrypted: bool
) -> None:
    """The 64-byte marker is in the workload's memory only (built at run time, not in argv).
    In clear (the control) it is found in the bucket; encrypted, in no object at all."""
    marker = secrets.token_hex(32).encode()
    extra = "" if encrypted else "  encryption: false\n"
    d = Daemon(workdir, s3_config(moto, bucket, extra))
    d.env.update(S3_ENV)
    try:
        d.start()
        port = free_port()
        d.cli(
            "run", "holder", "--no-auto-restore", "--",
            sys.executable, str(MARKER_PROGRAM), str(port), marker[::-1].decode(),
        )  # fmt: skip
        assert http_get(port) == "ready"
        d.checkpoint("holder")
        d.stop()  # the spool drains to the bucket before the daemon exits
        found = [
            key
            for key, data in all_objects(moto, bucket)
            if marker in data or marker in decompressed(data)
        ]
        if encrypted:
            assert found == []
            assert any(k.startswith("ckpt/keys/") for k in moto.keys(bucket, "ckpt/"))
        else:
            assert any(k.endswith(".pack") for k in found), "control: the marker is in memory"
    finally:
        d.stop()


def daemon_fails(config: Path) -> str:
    r = subprocess.run(
        [*CLI, "daemon", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_missing_wrong_or_exposed_key_stops_the_daemon_with_one_clear_error(
    workdir: Path,
) -> None:
    d = Daemon(workdir)
    try:
        d.start()  # a new repository, with a new key file
    finally:
        d.stop()
    assert d.key_file.stat().st_mode & 0o777 == 0o600
    repo_dir = d.state / "repository"
    before = tree(repo_dir)
    good = d.key_file.read_bytes()

    d.key_file.chmod(0o644)
    assert "chmod 600" in daemon_fails(d.config)
    doctor = d.cli("doctor", check=False)
    assert doctor.returncode != 0 and "chmod 600" in doctor.stdout + doctor.stderr

    d.key_file.unlink()
    message = daemon_fails(d.config)
    assert "does not exist" in message and "copy the key file" in message
    assert not d.key_file.exists()  # no new key made for a repository that has one

    (workdir / "other").mkdir()
    other = Daemon(workdir / "other")
    try:
        other.start()
    finally:
        other.stop()
    d.key_file.write_bytes(other.key_file.read_bytes())
    d.key_file.chmod(0o600)
    assert "opens none of the" in daemon_fails(d.config)

    assert tree(repo_dir) == before  # nothing written by any refused start
    d.key_file.write_bytes(good)
    d.start()
    d.stop()


def two_checkpoints(d: Daemon, port: int) -> tuple[str, str]:
    d.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
    serve(port, 3)
    older = d.checkpoint("web")
    serve(port, 4)
    newer = d.checkpoint("web")
    return older, newer


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(data))


def tamper(d: Daemon, case: str, older: str, newer: str, pwned: Path) -> str:
    """Damage the repository as a bucket writer could; returns the checkpoint that must be
    refused (the newest one the restore will try)."""
    repo = open_repo(d)
    root = d.state / "repository"
    mine = sorted(set(repo.packs_of("web", newer)) - set(repo.packs_of("web", older)))
    assert mine, "the newer checkpoint has packs of its own"
    if case == "pack":
        flip(root / pack_key(mine[0], "web"), 4000)
    elif case == "index":
        flip(root / index_key(mine[0], "web"), 60)
    elif case == "manifest":
        flip(root / manifest_key("web", newer), 200)
    elif case in ("other-repository", "plain-spec"):
        manifest = repo.read_manifest("web", newer)
        manifest.metadata["spec"]["command"] = ["/bin/sh", "-c", f"touch {pwned}"]
        planted = b"".join(manifest.pieces())
        if case == "other-repository":
            planted = Sealed(new_master()).seal(manifest_key("web", newer), planted)
        target = root / manifest_key("web", newer)
        target.chmod(0o600)
        target.write_bytes(planted)
    elif case == "replayed":
        from storage.manifest import new_checkpoint_id

        replay = new_checkpoint_id()
        (root / manifest_key("web", replay)).write_bytes(
            (root / manifest_key("web", older)).read_bytes()
        )
        return replay
    return newer


@pytest.mark.parametrize(
    "case", ["pack", "index", "manifest", "other-repository", "plain-spec", "replayed"]
)
def test_tampered_checkpoint_is_refused_and_the_older_good_one_restored(
    workdir: Path, case: str
) -> None:
    d = Daemon(workdir)
    port = free_port()
    pwned = workdir / "pwned"
    try:
        d.start()
        older, newer = two_checkpoints(d, port)
        refused = tamper(d, case, older, newer, pwned)
        d.drop_kept_images()  # as after a reboot: the repository is all there is
        os.kill(d.pid("web"), 9)
        if case == "replayed":
            # A copy of the older manifest under a newer id does not open under that name:
            # it is never listed, so never restored; the real newest checkpoint is.
            st = d.wait_for("web", lambda s: s["state"] == "running" and s["restores"])
            assert st["restores"][-1]["checkpoint"] == newer
            assert refused not in [c["id"] for c in d.json("list", "web")]
            assert http_get(port) == "8"
        else:
            st = d.wait_for(
                "web", lambda s: s["state"] == "running" and refused in s["bad_checkpoints"]
            )
            assert st["restores"][-1]["checkpoint"] == older
            assert http_get(port) == "4", d.log.read_text()[-3000:]
            log = d.log.read_text()
            assert "fails authentication" in log or "not sealed" in log
        assert not pwned.exists()
    finally:
        d.stop()


def test_two_keys_open_one_repository_and_a_removed_key_opens_nothing(workdir: Path) -> None:
    d = Daemon(workdir)
    try:
        d.start()
        port = free_port()
        d.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        serve(port, 2)
        cid = d.checkpoint("web")
    finally:
        d.stop()
    second = workdir / "second.key"
    added = json.loads(
        run_cli("key", "add", "--new-key-file", str(second), "--json", config=d.config)
    )["id"]
    assert second.stat().st_mode & 0o777 == 0o600
    # A second host's config: same repository, the other key.
    cfg2 = workdir / "second.yaml"
    cfg2.write_text(
        d.config.read_text().replace(str(d.key_file), str(second))
        + f"\nsocket: {workdir / 'second.sock'}\n"
    )
    listed = run_cli("key", "list", "--json", config=cfg2)
    ids = {k["id"]: k["current"] for k in json.loads(listed)}
    assert len(ids) == 2 and ids[added] is True
    first = next(k for k in ids if k != added)
    assert run_cli("key", "remove", first, config=cfg2).strip() == f"removed key {first}"
    # The removed key opens nothing; the remaining one still reads every checkpoint.
    assert "opens none of the 1 key" in run_cli("key", "list", config=d.config, code=1)
    config = load_config(cfg2)
    backend = LocalBlobStore(config.repository_path)
    opened = keyring.open_repository_codec(backend, read_secret_file(second, "key file"), "t")
    repo = Repository(backend, codec=opened.codec)
    assert [c.id for c in repo.checkpoints("web")] == [cid]
    repo.verify("web", cid)
    assert "last key" in run_cli("key", "remove", added, config=cfg2, code=1)


def run_cli(*args: str, config: Path, code: int = 0) -> str:
    r = subprocess.run(
        [*CLI, *args[:2], "--config", str(config), *args[2:]],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    return r.stdout if code == 0 else r.stderr


def test_a_repository_in_clear_is_refused_with_encryption_on_and_read_with_it_off(
    workdir: Path,
) -> None:
    d = Daemon(workdir)
    src = workdir / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(8192))
    old = Repository(LocalBlobStore(d.state / "repository")).commit("web", src)
    message = daemon_fails(d.config)
    assert "unencrypted" in message and "encryption: false" in message
    assert not d.key_file.exists()
    d.config.write_text(
        d.config.read_text().replace("storage:\n", "storage:\n  encryption: false\n")
    )
    try:
        d.start()
        assert [c["id"] for c in d.json("list", "web")] == [old.id]
        assert d.json("verify", "web")["ok"]
    finally:
        d.stop()
