"""Build the storage stack the config asks for: the only place that knows both config and storage/.

local:  Repository (codec: sealed or plain) → Instrumented → LocalBlobStore
s3:     Repository → SpooledBlobStore (local spool and cache) → RetryingBlobStore
                   → Instrumented → S3BlobStore
        (fleet: the heads, like the leases, on the RetryingBlobStore, past the spool)
"""

from __future__ import annotations

import contextlib
import logging
import socket

from checkpointer.config import Config
from checkpointer.daemon.metrics import Metrics
from checkpointer.repository.key import RepositoryKeyError, open_codec
from storage import Repository
from storage.backends import BlobStore, LocalBlobStore
from storage.backends.instrumented import InstrumentedBlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.spooled import SpooledBlobStore
from storage.errors import StorageError, TransientStorageError
from storage.heads import Heads
from storage.keyring import Opened
from storage.keys import CONFIG, KEYS

log = logging.getLogger(__name__)


def _instrument(store: BlobStore, metrics: Metrics | None) -> BlobStore:
    if metrics is None:
        return store
    return InstrumentedBlobStore(
        store,
        on_op=lambda op: metrics.storage_ops.labels(op).inc(),
        on_error=lambda op: metrics.storage_errors.labels(op).inc(),
    )


def remote_store(config: Config, metrics: Metrics | None) -> BlobStore:
    # boto3 is imported here, not with this module: it is a quarter of a local daemon's
    # resident memory (24 MB) and a local repository never calls it.
    from storage.backends.s3 import S3BlobStore, S3Settings

    s = config.storage
    assert s.s3 is not None
    settings = S3Settings(**s.s3.model_dump(), max_pool_connections=max(16, 2 * s.concurrency))
    return RetryingBlobStore(
        _instrument(S3BlobStore(settings), metrics),
        attempts=s.retries.attempts,
        max_delay=s.retries.max_delay,
        on_retry=(lambda op: metrics.storage_retries.labels(op).inc()) if metrics else None,
    )


def open_repository(
    config: Config, metrics: Metrics | None = None
) -> tuple[Repository, SpooledBlobStore | None]:
    """The repository, opened with its key (RepositoryKeyError if that fails: nothing is
    written then, except a new key file for a new repository)."""
    s = config.storage
    host = socket.gethostname()
    if s.backend == "local":
        backend = _instrument(LocalBlobStore(config.repository_path), metrics)
        opened = open_codec(config, backend, host)
        return Repository(backend, s.concurrency, s.gc_grace, opened.codec), None
    remote = remote_store(config, metrics)
    reachable = True
    try:
        remote.check()  # bad credentials or a missing bucket: fail now, clearly
    except TransientStorageError as e:
        reachable = False
        log.error("object storage unreachable at start; checkpoints will be spooled: %s", e)
    spool = SpooledBlobStore(
        remote,
        config.cache_path,
        s.concurrency,
        s.cache_max_bytes,
        on_upload=metrics.uploaded_bytes.inc if metrics else None,
        recheck_after=s.gc_grace / 2,
    )
    try:
        opened = _open_codec(config, remote, reachable, host)
    except BaseException:
        spool.close()  # its uploader thread would outlive the failed start (and its folder)
        raise
    # Fleet: which checkpoints exist is what each workload's head says, written only with
    # conditional writes on the bucket itself (storage/heads.py), never through the spool.
    heads = Heads(remote, opened.codec) if config.fleet.enabled else None
    return Repository(spool, s.concurrency, s.gc_grace, opened.codec, heads), spool


def _open_codec(config: Config, remote: BlobStore, reachable: bool, host: str) -> Opened:
    """The bucket's repository opened with this host's key: from the bucket if it answered,
    else from the state folder's copy of its keys."""
    keys_copy = LocalBlobStore(config.state_dir / "repository-keys")
    if reachable:
        # The bucket is the authority on whether the repository exists and which keys open
        # it. Its config and key objects (sealed and wrapped: nothing secret in them) are
        # mirrored into the state folder, so that after a reboot with the network not up yet
        # the daemon still opens the repository and its restores wait for the bucket.
        opened = open_codec(config, remote, host)
        if config.storage.encryption:
            _mirror_keys(remote, keys_copy)
    else:
        if config.storage.encryption and not keys_copy.exists(CONFIG):
            raise RepositoryKeyError(
                "object storage is unreachable and this host has never opened the repository "
                "(no copy of its keys in the state folder): start again when it is reachable"
            )
        opened = open_codec(config, keys_copy, host, create=False)
    return opened


def _mirror_keys(remote: BlobStore, copy: BlobStore) -> None:
    wanted = {CONFIG, *remote.list(KEYS)}
    for key in sorted(wanted):
        if not copy.exists(key):
            with contextlib.suppress(StorageError, OSError):
                copy.put(key, remote.get(key, 64 * 1024))
    for key in set(copy.list(KEYS)) - wanted:  # removed from the repository: not ours any more
        copy.delete(key)
