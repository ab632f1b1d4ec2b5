"""Retries as a layer around any blob store (restic's RetryBackend), with tenacity.

Only TransientStorageError is retried; backends decide what is transient, in one place each.
botocore's own retries are turned off in the S3 backend so that attempts do not multiply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from storage.backends.base import BlobStore
from storage.errors import TransientStorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingBlobStore(BlobStore):
    def __init__(
        self,
        inner: BlobStore,
        attempts: int = 5,
        max_delay: float = 60.0,
        initial_wait: float = 0.2,
        max_wait: float = 10.0,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.attempts = attempts
        self.max_delay = max_delay
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.on_retry = on_retry
        self.retries = 0

    def describe(self) -> str:
        return self.inner.describe()

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        def before_sleep(state: RetryCallState) -> None:
            self.retries += 1
            if self.on_retry:
                self.on_retry(op)
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "storage %s failed (attempt %d of %d), retrying: %s",
                op,
                state.attempt_number,
                self.attempts,
                exc,
            )

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.max_delay),
            wait=wait_exponential_jitter(multiplier=self.initial_wait, max=self.max_wait),
            retry=retry_if_exception_type(TransientStorageError),
            reraise=True,
            before_sleep=before_sleep,
        )
        return retrying(fn)

    def check(self) -> None:
        self._call("check", self.inner.check)

    def put(self, key: str, data: bytes) -> None:
        self._call("put", lambda: self.inner.put(key, data))

    def get(self, key: str) -> bytes:
        return self._call("get", lambda: self.inner.get(key))

    def exists(self, key: str) -> bool:
        return self._call("exists", lambda: self.inner.exists(key))

    def list(self, prefix: str) -> Iterator[str]:
        # Listing is retried as a whole: a half-read listing is never returned.
        return iter(self._call("list", lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.inner.delete(key))
