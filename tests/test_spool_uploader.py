"""The spool's uploader thread (storage/backends/spooled.py) lives exactly as long as its spool:
an error reading its queue does not end it, and a storage stack that fails to open does not
leave one running.

Seen in test runs as `PytestUnhandledThreadExceptionWarning: Exception in thread uploader ...
FileNotFoundError: .../c-state/cache/queue`: stacks built by `open_repository` and never closed
(one whose key did not open the repository, raising before its caller got the spool to close)
kept their uploader running after their folder was removed, and the first listing of the gone
queue killed the thread. In a daemon the same unguarded listing meant that one failed read of
the queue folder (EIO, EMFILE) ended every upload for good while checkpoints kept spooling.

Then (review of 34362fd): its back-off waited on the condition every put notifies, so under a
stream of puts it read the failing folder and logged a traceback once per put, reached its 30 s
cap in seconds, and `online` stayed True; and a queue file that was no operation (no space in
it, not UTF-8) raised ValueError from the queue's listing, which killed the uploader, or the
daemon at start.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path

import pytest

from checkpointer.config import Config
from checkpointer.repository import stack
from checkpointer.repository.key import RepositoryKeyError
from storage import keyring
from storage.access_keys import AccessSecret
from storage.backends.base import BlobStore
from storage.backends.local import LocalBlobStore
from storage.backends.spool_queue import Entries, SpoolQueue
from storage.backends.spooled import SpooledBlobStore
from storage.keys import index_key, manifest_key, pack_key

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def _uploaders() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "uploader" and t.is_alive()}


class _QueueFailingOnce(SpoolQueue):
    """A queue folder whose listing fails once for the uploader (a local disk error)."""

    failed = False

    def entries(self) -> Entries:
        if threading.current_thread().name == "uploader" and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "Input/output error", str(self.folder))
        return super().entries()


def test_the_uploader_survives_a_failed_read_of_its_queue(tmp_path: Path) -> None:
    remote = LocalBlobStore(tmp_path / "remote")
    spool = SpooledBlobStore(remote, tmp_path / "spool")
    try:
        queue = spool.queue = _QueueFailingOnce(spool.queue_dir)
        spool.put("packs/aa/" + "a" * 32 + ".pack", b"spooled")
        # The uploader's listing fails once; it tries again (after a second's back-off) and
        # the blob reaches the remote. Before: the thread died and nothing was uploaded again.
        assert spool.wait_uploaded(10), "the uploader stopped after one failed queue read"
        assert queue.failed
        assert remote.get("packs/aa/" + "a" * 32 + ".pack") == b"spooled"
    finally:
        spool.close()


def test_a_stack_whose_key_does_not_open_the_repository_leaves_no_uploader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's stack on a bucket (here a local folder stands in for S3) whose repository
    another key made: open_repository raises, and the spool it started is closed."""
    remote = LocalBlobStore(tmp_path / "bucket")
    keyring.open_repository_codec(remote, AccessSecret.generate(), "another-host")
    ours = tmp_path / "ours.key"
    ours.write_text(AccessSecret.generate().file_text())
    ours.chmod(0o600)

    def the_bucket(config: Config, metrics: object) -> BlobStore:
        return remote

    monkeypatch.setattr(stack, "remote_store", the_bucket)
    config = Config.model_validate(
        {
            "state_dir": str(tmp_path / "state"),
            "metrics": {"enabled": False},
            "storage": {
                "backend": "s3",
                "key_file": str(ours),
                "s3": {"bucket": "b", "endpoint_url": "http://127.0.0.1:9", "region": "x"},
            },
        }
    )
    before = _uploaders()
    with pytest.raises(RepositoryKeyError):
        stack.open_repository(config)
    assert _uploaders() - before == set(), "the failed open left its spool's uploader running"


class _QueueFailing(SpoolQueue):
    """A queue folder whose listing fails for the uploader while `broken` (a disk error)."""

    broken = True
    reads = 0  # the uploader's attempts while broken

    def entries(self) -> Entries:
        if threading.current_thread().name == "uploader" and self.broken:
            self.reads += 1
            raise OSError(errno.EIO, "Input/output error", str(self.folder))
        return super().entries()


def test_puts_do_not_cut_the_back_off_short_and_the_outage_shows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = LocalBlobStore(tmp_path / "remote")
    spool = SpooledBlobStore(remote, tmp_path / "spool")
    try:
        queue = spool.queue = _QueueFailing(spool.queue_dir)
        caplog.set_level(logging.INFO, logger="storage.backends.spooled")
        started, n = time.monotonic(), 0
        while time.monotonic() - started < 3.0:  # a checkpoint writing packs
            spool.put(f"packs/{n:04d}", b"x" * 10)
            n += 1
            time.sleep(0.01)
        # Back-off 1 s then 2 s: 2 or 3 reads in 3 s. Before: one per put (~130 here).
        assert queue.reads <= 4, f"{queue.reads} reads of the failing queue for {n} puts"
        complaints = [r for r in caplog.records if "cannot read its queue" in r.getMessage()]
        assert len(complaints) == 1, "one log line per failure streak, not one per put"
        assert not complaints[0].exc_info, "a disk error's traceback says nothing more"
        assert not spool.online, "status and checkpointer_storage_online must show it"
        # The remote still answers: a local fault does not make listings refuse.
        assert "packs/0000" in set(spool.list("packs/"))
        queue.broken = False
        # Picked up at the next attempt (at most 4 s on), with no put to wake it. Before: the
        # back-off was at its 30 s cap already.
        assert spool.wait_uploaded(8), "the uploader did not come back once its queue read"
        assert spool.online
        assert set(remote.list("packs/")) == {f"packs/{i:04d}" for i in range(n)}
        assert any("works again" in r.getMessage() for r in caplog.records)
    finally:
        spool.close()


def _corrupt(queue_dir: Path, name: str, content: bytes) -> Path:
    """A queue file as a disk error or a crash mid-write may leave it."""
    (queue_dir / name).write_bytes(content)
    return queue_dir / (name + ".bad")


def test_a_corrupt_queue_entry_is_set_aside_once_and_uploads_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = LocalBlobStore(tmp_path / "remote")
    caplog.set_level(logging.ERROR)
    spool = SpooledBlobStore(remote, tmp_path / "spool")
    try:
        spool.put("packs/a", b"a")
        assert spool.wait_uploaded(10)
        # Found by the running uploader (before: ValueError killed it, nothing uploaded again).
        running = _corrupt(spool.queue_dir, "0000000000000000", b"\xff\xfeP packs/a")
        spool.put("packs/b", b"b")
        assert spool.wait_uploaded(10), "a corrupt queue entry stopped the uploads"
    finally:
        spool.close()
    # Found at start (before: the spool, so the daemon, did not start).
    at_start = [
        _corrupt(spool.queue_dir, "9000000000000000", b"packs/no-space-in-it"),
        _corrupt(spool.queue_dir, "9000000000000001", b"X packs/an-unknown-operation"),
    ]
    spool = SpooledBlobStore(remote, tmp_path / "spool")
    try:
        spool.put("packs/c", b"c")
        assert spool.wait_uploaded(10)
        assert spool.pending_keys() == []
    finally:
        spool.close()
    # Nothing of them was sent, the good blobs were, and each is kept aside for a person.
    assert set(remote.list("")) == {"packs/a", "packs/b", "packs/c"}
    assert all(bad.exists() for bad in [running, *at_start])
    said = [r for r in caplog.records if "is not an operation" in r.getMessage()]
    assert len(said) == 3, "one log line per corrupt entry, not one per read of the queue"


def test_a_manifest_whose_pack_entry_was_set_aside_never_goes_up_without_it(
    tmp_path: Path,
) -> None:
    """The commit's pack (and index) are in the cache, but the queue entry of the pack was
    corrupt: the pack is sent from the local copy before the manifest that names it."""
    remote = LocalBlobStore(tmp_path / "remote")
    folder = tmp_path / "spool"
    spool = SpooledBlobStore(remote, folder)
    spool.close()
    pack, index, manifest = pack_key("p1", "w"), index_key("p1", "w"), manifest_key("w", "c1")
    spool.cache.put(pack, b"pack bytes")
    _corrupt(spool.queue_dir, "0000000000000001", b"P " + pack.encode() + b"\xff")
    spool = SpooledBlobStore(remote, folder)
    try:
        spool.put(index, b"index bytes")
        spool.needs(manifest, [pack, index])
        spool.put(manifest, b"manifest bytes")
        assert spool.wait_uploaded(10)
    finally:
        spool.close()
    assert remote.get(pack) == b"pack bytes", "the manifest went up naming a pack never sent"
    assert remote.get(manifest) == b"manifest bytes"
