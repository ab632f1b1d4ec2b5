"""Build the storage stack the config asks for: the only place that knows both config and storage/.

local:  Repository → LocalBlobStore
s3:     Repository → SpooledBlobStore (local spool and cache) → RetryingBlobStore → S3BlobStore
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from checkpointer.config import Config
from storage import Repository
from storage.backends import BlobStore, LocalBlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.backends.spooled import SpooledBlobStore
from storage.errors import TransientStorageError

log = logging.getLogger(__name__)


def remote_store(config: Config, on_retry: Callable[[str], None] | None = None) -> BlobStore:
    s = config.storage
    assert s.s3 is not None
    settings = S3Settings(**s.s3.model_dump(), max_pool_connections=max(16, 2 * s.concurrency))
    return RetryingBlobStore(
        S3BlobStore(settings),
        attempts=s.retries.attempts,
        max_delay=s.retries.max_delay,
        on_retry=on_retry,
    )


def open_repository(
    config: Config,
    on_retry: Callable[[str], None] | None = None,
    on_upload: Callable[[int], None] | None = None,
) -> tuple[Repository, SpooledBlobStore | None]:
    s = config.storage
    if s.backend == "local":
        backend = LocalBlobStore(config.repository_path)
        return Repository(backend, s.concurrency, s.gc_grace), None
    remote = remote_store(config, on_retry)
    try:
        remote.check()  # bad credentials or a missing bucket: fail now, clearly
    except TransientStorageError as e:
        log.error("object storage unreachable at start; checkpoints will be spooled: %s", e)
    spool = SpooledBlobStore(
        remote, config.cache_path, s.concurrency, s.cache_max_bytes, on_upload=on_upload
    )
    return Repository(spool, s.concurrency, s.gc_grace), spool
