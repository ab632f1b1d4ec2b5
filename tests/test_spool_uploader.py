"""The spool's uploader thread (storage/backends/spooled.py) lives exactly as long as its spool:
an error reading its queue does not end it, and a storage stack that fails to open does not
leave one running.

Seen in test runs as `PytestUnhandledThreadExceptionWarning: Exception in thread uploader ...
FileNotFoundError: .../c-state/cache/queue`: stacks built by `open_repository` and never closed
(one whose key did not open the repository, raising before its caller got the spool to close)
kept their uploader running after their folder was removed, and the first listing of the gone
queue killed the thread. In a daemon the same unguarded listing meant that one failed read of
the queue folder (EIO, EMFILE) ended every upload for good while checkpoints kept spooling.
"""

from __future__ import annotations

import errno
import threading
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
