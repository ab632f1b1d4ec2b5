"""Counts a blob store's operations and errors through callbacks (the daemon's metrics), so
that storage/ knows nothing of Prometheus."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from storage.backends.base import BlobStore
from storage.backends.wrapper import WrappedBlobStore
from storage.errors import BlobExists, BlobNotFound

T = TypeVar("T")


class InstrumentedBlobStore(WrappedBlobStore):
    def __init__(
        self, inner: BlobStore, on_op: Callable[[str], None], on_error: Callable[[str], None]
    ) -> None:
        super().__init__(inner)
        self.on_op = on_op
        self.on_error = on_error

    def around(self, op: str, fn: Callable[[], T]) -> T:
        self.on_op(op)
        try:
            return fn()
        except (BlobNotFound, BlobExists):
            raise  # answers, not failures
        except Exception:
            self.on_error(op)
            raise
