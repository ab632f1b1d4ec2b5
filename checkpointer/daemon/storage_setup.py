"""Build the storage stack the config asks for: the only place that knows both config and storage/.

local:  Repository → Instrumented → LocalBlobStore
s3:     Repository → SpooledBlobStore (local spool and cache) → RetryingBlobStore
                   → Instrumented → S3BlobStore
"""

from __future__ import annotations

import logging

from checkpointer.config import Config
from checkpointer.daemon.metrics import Metrics
from checkpointer.instrumented_store import InstrumentedBlobStore
from storage import Repository
from storage.backends import BlobStore, LocalBlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.backends.spooled import SpooledBlobStore
from storage.errors import TransientStorageError

log = logging.getLogger(__name__)


def _instrument(store: BlobStore, metrics: Metrics) -> BlobStore:
    return InstrumentedBlobStore(
        store,
        on_op=lambda op: metrics.storage_ops.labels(op).inc(),
        on_error=lambda op: metrics.storage_errors.labels(op).inc(),
    )


def remote_store(config: Config, metrics: Metrics) -> BlobStore:
    s = config.storage
    assert s.s3 is not None
    settings = S3Settings(**s.s3.model_dump(), max_pool_connections=max(16, 2 * s.concurrency))
    return RetryingBlobStore(
        _instrument(S3BlobStore(settings), metrics),
        attempts=s.retries.attempts,
        max_delay=s.retries.max_delay,
        on_retry=lambda op: metrics.storage_retries.labels(op).inc(),
    )


def open_repository(config: Config, metrics: Metrics) -> tuple[Repository, SpooledBlobStore | None]:
    s = config.storage
    if s.backend == "local":
        backend = _instrument(LocalBlobStore(config.repository_path), metrics)
        return Repository(backend, s.concurrency, s.gc_grace), None
    remote = remote_store(config, metrics)
    try:
        remote.check()  # bad credentials or a missing bucket: fail now, clearly
    except TransientStorageError as e:
        log.error("object storage unreachable at start; checkpoints will be spooled: %s", e)
    spool = SpooledBlobStore(
        remote,
        config.cache_path,
        s.concurrency,
        s.cache_max_bytes,
        on_upload=metrics.uploaded_bytes.inc,
    )
    return Repository(spool, s.concurrency, s.gc_grace), spool
