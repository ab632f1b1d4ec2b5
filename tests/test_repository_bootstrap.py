"""Creating and opening an encrypted repository against crashes, races and a hostile bucket.

Everything goes through the daemon's own path (checkpointer/repository/stack.py
`open_repository`, the production storage stack) on a local folder and on S3 (moto over
HTTP). A creator is killed with SIGKILL by a real subprocess whose blob store kills it at a
chosen put; the next start must open or create the repository, commit and read back.
No CRIU needed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from checkpointer.config import Config, load_config
from checkpointer.errors import ConfigError
from checkpointer.repository.key import RepositoryKeyError, read_secret_file
from checkpointer.repository.stack import open_repository
from storage import access_keys, keyring
from storage.access_keys import AccessSecret, WrongKey, wrap
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.backends.wrapper import WrappedBlobStore
from storage.crypto import Sealed, new_master
from storage.errors import TransientStorageError
from storage.keys import CONFIG, KEYS, key_key
from tests.support import CLI, ROOT, S3_ENV, Moto, s3_repository_config

BACKENDS = ["local", "s3"]
T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------


def host_config(kind: str, base: Path, url: str = "", bucket: str = "") -> Config:
    """A host's config: state under `base/<host>`, the key file and (local) the repository
    shared under `base`, as hosts sharing one bucket and one key file are."""
    if kind == "s3":
        return s3_repository_config(base / "state", base.parent / "repository.key", url, bucket)
    return Config.model_validate(
        {
            "state_dir": str(base / "state"),
            "metrics": {"enabled": False},
            "storage": {
                "path": str(base.parent / "repository"),
                "key_file": str(base.parent / "repository.key"),
            },
        }
    )


def raw_store(
    kind: str, base: Path, moto: Moto | None, bucket: str, prefix: str = "ckpt"
) -> BlobStore:
    """The repository's objects as they are, for planting and looking."""
    if kind == "local":
        return LocalBlobStore(base / "repository")
    assert moto is not None
    return S3BlobStore(
        S3Settings(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=moto.url,
            region="us-east-1",
            addressing_style="path",
            access_key_id="testing",
            secret_access_key="testing",
        )
    )


def commit_and_read_back(config: Config, tmp: Path) -> str:
    """A start: open (or create), commit a small image, read it back; the checkpoint's id."""
    src = tmp / "image"
    src.mkdir(exist_ok=True)
    (src / "pages-1.img").write_bytes(os.urandom(20000) * 3)
    (src / "core-1.img").write_bytes(b"core")
    repo, spool = open_repository(config)
    try:
        m = repo.commit("web", src)
        if spool is not None:
            assert spool.wait_uploaded(30)
        out = tmp / f"out-{m.id}"
        repo.materialize("web", m.id, out)
        for name in ("pages-1.img", "core-1.img"):
            assert (out / name).read_bytes() == (src / name).read_bytes()
        return m.id
    finally:
        if spool is not None:
            spool.close()


def restore_elsewhere(config: Config, checkpoint_id: str, out: Path) -> None:
    repo, spool = open_repository(config)
    try:
        repo.materialize("web", checkpoint_id, out)
        assert (out / "core-1.img").read_bytes() == b"core"
    finally:
        if spool is not None:
            spool.close()


@pytest.fixture(params=BACKENDS)
def where(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path, Moto | None, str]]:
    """(backend, base folder, moto or None, bucket): one repository to create."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    if request.param == "local":
        yield "local", tmp_path, None, ""
        return
    moto = Moto()
    try:
        bucket = f"ckpt-{os.getpid()}-{time.monotonic_ns() % 10**8}"
        moto.client().create_bucket(Bucket=bucket)
        yield "s3", tmp_path, moto, bucket
    finally:
        moto.stop()


# -- kill -9 at every step of creation --------------------------------------------------------

_CREATOR = """
import os, signal, sys
from pathlib import Path
from checkpointer.repository.stack import open_repository
from checkpointer.errors import ConfigError
from storage.backends.local import LocalBlobStore
from storage.backends.s3 import S3BlobStore
from tests.test_repository_bootstrap import host_config

kind, base, url, bucket, kill_after = sys.argv[1:6]
store = LocalBlobStore if kind == "local" else S3BlobStore
real, done = store.put, []

def put(self, key, data):
    if int(kill_after) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, key, data)
    done.append(key)
    print("put", key, flush=True)
    if len(done) == int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)

store.put = put
open_repository(host_config(kind, Path(base), url, bucket))
print("opened, not killed", flush=True)
"""


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_a_creator_killed_at_any_step_leaves_a_repository_the_next_start_opens_or_creates(
    where: tuple[str, Path, Moto | None, str], kill_after: int
) -> None:
    """kill -9 before the first put, between the key and `config`, and after both; then a
    fresh start (the same host again) commits and reads back, and a second host with the
    same key file restores that checkpoint from the shared repository."""
    kind, base, moto, bucket = where
    url = moto.url if moto else ""
    env = {**os.environ, **S3_ENV, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", _CREATOR, kind, str(base / "a"), url, bucket, str(kill_after)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.count("put ") == kill_after, r.stdout

    checkpoint_id = commit_and_read_back(host_config(kind, base / "a", url, bucket), base)
    restore_elsewhere(host_config(kind, base / "b", url, bucket), checkpoint_id, base / "out-b")


# -- two creators at once -----------------------------------------------------------------------


def _race(
    store: Callable[[], BlobStore], secrets: list[AccessSecret]
) -> list[keyring.Opened | Exception]:
    """A host per secret, each with its own store, opens the repository at the same instant;
    what each got."""
    barrier = threading.Barrier(len(secrets))
    results: list[keyring.Opened | Exception] = [ValueError("not run")] * len(secrets)

    def host(i: int) -> None:
        backend = store()
        barrier.wait()
        try:
            results[i] = keyring.open_repository_codec(backend, secrets[i], f"host-{i}")
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=host, args=(i,)) for i in range(len(secrets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_hosts_creating_at_the_same_moment_end_with_one_repository(
    where: tuple[str, Path, Moto | None, str],
) -> None:
    """Same key file on 6 hosts: all open the one repository, one key object is left (the
    losers delete theirs). Then 6 hosts with 6 different key files on a new location: one
    creates, the others are told to copy its key file; none adopts or overwrites."""
    kind, base, moto, bucket = where

    def store(name: str) -> Callable[[], BlobStore]:
        return lambda: raw_store(kind, base / name, moto, bucket, name)

    shared = AccessSecret.generate()
    for round_ in range(3):
        results = _race(store(f"same-{round_}"), [shared] * 6)
        assert all(isinstance(r, keyring.Opened) for r in results), results
        assert len({r.master for r in results if isinstance(r, keyring.Opened)}) == 1
        assert len(list(store(f"same-{round_}")().list(KEYS))) == 1

    results = _race(store("different"), [AccessSecret.generate() for _ in range(6)])
    opened = [r for r in results if isinstance(r, keyring.Opened)]
    refused = [r for r in results if isinstance(r, WrongKey)]
    assert len(opened) == 1 and len(refused) == 5, results
    # A host that lost the creation race is told so; one whose first look came after the
    # creation (threads start late on a loaded machine) gets the wrong-key answer: both say
    # to copy the creator's key file.
    assert all(
        "another host created the repository" in str(e) or "wrong key file" in str(e)
        for e in refused
    ), refused
    assert all("key file" in str(e) for e in refused), refused
    assert list(store("different")().list(KEYS)) == [key_key(opened[0].key_id or "")]


class _Passing(WrappedBlobStore):
    def around(self, op: str, fn: Callable[[], T]) -> T:
        return fn()


class _Interleaved(_Passing):
    """Runs `between` once, right after this host's key object is written: another host's
    whole creation lands between our two steps."""

    def __init__(self, inner: BlobStore, between: Callable[[], None]) -> None:
        super().__init__(inner)
        self.between: Callable[[], None] | None = between

    def put(self, key: str, data: bytes | memoryview) -> None:
        super().put(key, data)
        if key.startswith(KEYS) and self.between is not None:
            between, self.between = self.between, None
            between()


def test_a_creation_that_lands_between_our_key_and_our_config_wins_and_we_open_it(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "repository")
    secret = AccessSecret.generate()
    theirs: list[keyring.Opened] = []
    interleaved = _Interleaved(
        store, lambda: theirs.append(keyring.open_repository_codec(store, secret, "b"))
    )
    ours = keyring.open_repository_codec(interleaved, secret, "a")
    assert ours.master == theirs[0].master and ours.key_id == theirs[0].key_id
    assert list(store.list(KEYS)) == [key_key(theirs[0].key_id or "")]


class _LostReply(_Passing):
    """The first put of `config` lands, but its reply is lost (a transient error)."""

    lost = False

    def put(self, key: str, data: bytes | memoryview) -> None:
        super().put(key, data)
        if key == CONFIG and not self.lost:
            self.lost = True
            raise TransientStorageError("connection reset after the request was sent")


def test_a_config_whose_put_reply_was_lost_is_recognised_as_ours(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repository")
    retrying = RetryingBlobStore(_LostReply(store), attempts=3, initial_wait=0.01)
    secret = AccessSecret.generate()
    opened = keyring.open_repository_codec(retrying, secret, "a")
    assert keyring.open_repository_codec(store, secret, "a").master == opened.master
    assert len(list(store.list(KEYS))) == 1


# -- a config without keys, left by a creator of an older version ------------------------------


def test_an_old_style_config_without_keys_is_waited_for_then_replaced(
    where: tuple[str, Path, Moto | None, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions before this wrote `config` first: killed before their key, they left a
    config no key opens, and every later start said "another host is initialising" for
    ever. Now: young, a clear wait; old (ABANDONED_AFTER), replaced, and the repository
    works; two hosts replacing it at once end with one master."""
    kind, base, moto, bucket = where
    url = moto.url if moto else ""
    store = raw_store(kind, base, moto, bucket)
    store.put(CONFIG, Sealed(new_master()).seal(CONFIG, b'{"version": 2}'))
    key_file = base / "repository.key"
    key_file.write_text(AccessSecret.generate().file_text())
    key_file.chmod(0o600)
    with pytest.raises(RepositoryKeyError, match="replaced automatically in"):
        open_repository(host_config(kind, base / "a", url, bucket))

    monkeypatch.setattr(keyring, "ABANDONED_AFTER", 0.0)  # moto cannot age an object
    shared = read_secret_file(key_file, "key file")
    results = _race(lambda: raw_store(kind, base, moto, bucket), [shared] * 4)
    assert all(isinstance(r, keyring.Opened) for r in results), results
    assert len({r.master for r in results if isinstance(r, keyring.Opened)}) == 1
    checkpoint_id = commit_and_read_back(host_config(kind, base / "a", url, bucket), base)
    restore_elsewhere(host_config(kind, base / "b", url, bucket), checkpoint_id, base / "out-b")


# -- hostile key objects ---------------------------------------------------------------------


def _planted_key(secret: AccessSecret, key_id: str) -> bytes:
    return wrap(new_master(), secret, key_id, "planted")


MALFORMED = {
    "00000001aaaa": b"[]",  # a list: `.get` raised AttributeError and no host could start
    "00000002aaaa": b"not json",
    "00000003aaaa": b"{}",
    "00000004aaaa": json.dumps({"kind": "file", "id": "00000004aaaa", "salt": 5}).encode(),
    "00000005aaaa": b"{" + b" " * 5000 + b"}",  # larger than any key object
    "00000006aaaa": json.dumps(
        {
            "kind": "passphrase",
            "id": "00000006aaaa",
            "salt": base64.b64encode(b"s" * 16).decode(),
            "kdf": {"n": 2**20, "r": 32, "p": 1},  # 4 GiB: hashlib raised ValueError
            "wrapped": base64.b64encode(b"w" * 60).decode(),
        }
    ).encode(),
    "00000007aaaa": json.dumps(
        {
            "kind": "passphrase",
            "id": "00000007aaaa",
            "salt": base64.b64encode(b"s" * 16).decode(),
            "kdf": {"n": 0, "r": 8, "p": 1},
            "wrapped": base64.b64encode(b"w" * 60).decode(),
        }
    ).encode(),
}


@pytest.mark.parametrize("passphrase", [False, True])
def test_planted_and_malformed_key_objects_do_not_keep_the_real_key_out(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    passphrase: bool,
) -> None:
    """100 well-formed planted keys and the malformed ones all sort before the real key
    (the old code tried only the first 64 and crashed on a JSON list): the daemon's path
    opens the repository, warns naming each malformed key, and commits."""
    config = host_config("local", tmp_path / "a")
    if passphrase:
        pass_file = tmp_path / "passphrase"
        pass_file.write_text("correct horse battery staple\n")
        pass_file.chmod(0o600)
        config.storage.passphrase_file = pass_file
    commit_and_read_back(config, tmp_path)
    store = LocalBlobStore(tmp_path / "repository")
    planter = AccessSecret.generate()  # a key file: planting 100 costs nothing
    for n in range(100):
        store.put(key_key(f"0000001{n:03d}bb"), _planted_key(planter, f"0000001{n:03d}bb"))
    commit_and_read_back(config, tmp_path)  # the 100 crowd the real key out of the first 64

    for key_id, blob in MALFORMED.items():
        store.put(key_key(key_id), blob)
    caplog.set_level(logging.WARNING, logger="storage.keyring")
    commit_and_read_back(config, tmp_path)
    for key_id in MALFORMED:
        assert f"keys/{key_id}" in caplog.text, key_id


def test_no_key_opening_is_one_clear_error_and_too_many_keys_are_refused_by_count(
    tmp_path: Path,
) -> None:
    config = host_config("local", tmp_path / "a")
    commit_and_read_back(config, tmp_path)
    store = LocalBlobStore(tmp_path / "repository")
    for key_id, blob in MALFORMED.items():
        store.put(key_key(key_id), blob)
    wrong = tmp_path / "wrong.key"
    wrong.write_text(AccessSecret.generate().file_text())
    wrong.chmod(0o600)
    config.storage.key_file = wrong
    with pytest.raises(RepositoryKeyError, match="opens none of the 8 key") as err:
        open_repository(config)
    assert "7 malformed, skipped" in str(err.value)

    for n in range(keyring.MAX_KEYS):
        store.put(key_key(f"0000002{n:03d}cc"), _planted_key(AccessSecret.generate(), "x" * 8))
    with pytest.raises(RepositoryKeyError, match=f"has {keyring.MAX_KEYS + 8} key objects"):
        open_repository(config)


def test_the_daemon_reports_a_repository_no_key_opens_without_a_traceback(
    tmp_path: Path,
) -> None:
    """`checkpointer daemon` on a repository with malformed keys and a wrong key file: one
    error line, exit 1."""
    config = host_config("local", tmp_path / "a")
    commit_and_read_back(config, tmp_path)
    store = LocalBlobStore(tmp_path / "repository")
    for key_id, blob in MALFORMED.items():
        store.put(key_key(key_id), blob)
    wrong = tmp_path / "wrong.key"
    wrong.write_text(AccessSecret.generate().file_text())
    wrong.chmod(0o600)
    conf = tmp_path / "config.yaml"
    conf.write_text(
        f"state_dir: {tmp_path / 'a' / 'state'}\nmetrics: {{enabled: false}}\n"
        f"storage:\n  path: {tmp_path / 'repository'}\n  key_file: {wrong}\n"
    )
    r = subprocess.run(
        [*CLI, "daemon", "--config", str(conf)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "opens none of the 8 key" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr


def test_fleet_mode_refuses_a_repository_in_clear_and_says_how_to_move(tmp_path: Path) -> None:
    """In clear, a bucket writer can hand a host a lease with a planted checkpoint."""
    conf = tmp_path / "config.yaml"
    conf.write_text(
        f"state_dir: {tmp_path / 'state'}\nmetrics: {{enabled: false}}\n"
        "fleet:\n  enabled: true\n"
        "storage:\n  backend: s3\n  encryption: false\n  s3:\n    bucket: fleet\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    for words in ("fleet.enabled needs storage.encryption", "new, empty location", "migrate"):
        assert words in str(err.value), str(err.value)
    r = subprocess.run(
        [*CLI, "daemon", "--config", str(conf)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "fleet.enabled needs storage.encryption" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr


# -- scrypt -----------------------------------------------------------------------------------


def test_new_passphrase_keys_use_scrypt_2_17_and_old_2_15_keys_still_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "repository")
    opened = keyring.open_repository_codec(store, AccessSecret.generate(), "a")
    new = AccessSecret(b"correct horse battery staple", "passphrase")
    new_id = keyring.add_key(store, opened, new, "a")
    assert json.loads(store.get(key_key(new_id)))["kdf"] == {"n": 2**17, "r": 8, "p": 1}

    old = AccessSecret(b"an old passphrase", "passphrase")
    monkeypatch.setattr(access_keys, "SCRYPT", {"n": 2**15, "r": 8, "p": 1})
    old_id = keyring.add_key(store, opened, old, "a")  # as versions before this wrote it
    monkeypatch.undo()
    assert json.loads(store.get(key_key(old_id)))["kdf"]["n"] == 2**15

    assert keyring.open_repository_codec(store, new, "b").master == opened.master
    assert keyring.open_repository_codec(store, old, "b").master == opened.master
