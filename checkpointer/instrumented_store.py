"""Counts a blob store's operations and errors for the metrics, without storage/ knowing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from storage.backends.base import BlobStore
from storage.errors import BlobExists, BlobNotFound

T = TypeVar("T")


class InstrumentedBlobStore(BlobStore):
    def __init__(
        self, inner: BlobStore, on_op: Callable[[str], None], on_error: Callable[[str], None]
    ) -> None:
        self.inner = inner
        self.on_op = on_op
        self.on_error = on_error

    def describe(self) -> str:
        return self.inner.describe()

    def _count(self, op: str, fn: Callable[[], T]) -> T:
        self.on_op(op)
        try:
            return fn()
        except (BlobNotFound, BlobExists):
            raise  # answers, not failures
        except Exception:
            self.on_error(op)
            raise

    def check(self) -> None:
        self._count("check", self.inner.check)

    def put(self, key: str, data: bytes) -> None:
        self._count("put", lambda: self.inner.put(key, data))

    def get(self, key: str) -> bytes:
        return self._count("get", lambda: self.inner.get(key))

    def exists(self, key: str) -> bool:
        return self._count("exists", lambda: self.inner.exists(key))

    def list(self, prefix: str) -> Iterator[str]:
        return iter(self._count("list", lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._count("delete", lambda: self.inner.delete(key))
