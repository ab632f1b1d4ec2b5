"""Retries as a layer around any blob store (restic's RetryBackend), with tenacity.

Only TransientStorageError is retried; backends decide what is transient, in one place each.
botocore's own retries are turned off in the S3 backend so that attempts do not multiply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
from storage.backends.wrapper import WrappedBlobStore
from storage.errors import TransientStorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingBlobStore(WrappedBlobStore):
    def __init__(
        self,
        inner: BlobStore,
        attempts: int = 5,
        max_delay: float = 60.0,
        initial_wait: float = 0.2,
        max_wait: float = 10.0,
        on_retry: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`sleep`: how the backoff between attempts waits (a simulation's virtual clock)."""
        super().__init__(inner)
        self.sleep = sleep
        self.attempts = attempts
        self.max_delay = max_delay
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.on_retry = on_retry
        self.retries = 0

    def around(self, op: str, fn: Callable[[], T]) -> T:
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
            sleep=self.sleep,
        )
        return retrying(fn)
