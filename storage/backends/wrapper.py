"""A blob store around another, with one hook around every operation.

kopia keeps `retrying` and `storagemetrics` as two small wrappers of one interface; here both
are subclasses of this one, each a single `around` method, so neither repeats the six
forwarding methods (and a new method of BlobStore is forwarded once, here).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from storage.backends.base import BlobStore

T = TypeVar("T")


class WrappedBlobStore(BlobStore):
    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner

    @abstractmethod
    def around(self, op: str, fn: Callable[[], T]) -> T:
        """Run one operation (`op` names it: put, get, exists, list, delete, check)."""

    def describe(self) -> str:
        return self.inner.describe()

    def check(self) -> None:
        self.around("check", self.inner.check)

    def server_time(self) -> float | None:
        return self.around("check", self.inner.server_time)

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.around("put", lambda: self.inner.put(key, data))

    def put_pieces(self, key: str, pieces: Callable[[], Iterable[bytes | memoryview]]) -> None:
        self.around("put", lambda: self.inner.put_pieces(key, pieces))

    def get(self, key: str, limit: int | None = None) -> bytes:
        return self.around("get", lambda: self.inner.get(key, limit))

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        return self.around("get", lambda: self.inner.get_into(key, buffer, limit))

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        return self.around("get", lambda: self.inner.get_range(key, offset, length))

    def exists(self, key: str) -> bool:
        return self.around("exists", lambda: self.inner.exists(key))

    def list(self, prefix: str) -> Iterator[str]:
        # Listed whole inside the hook: a half-read listing is never returned (or retried
        # from where it stopped).
        return iter(self.around("list", lambda: list(self.inner.list(prefix))))

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        return iter(self.around("list", lambda: list(self.inner.list_versions(prefix))))

    def delete(self, key: str) -> None:
        self.around("delete", lambda: self.inner.delete(key))

    def modified(self, key: str) -> float | None:
        return self.around("exists", lambda: self.inner.modified(key))

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        return self.around("get", lambda: self.inner.get_versioned(key, limit))

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        return self.around("put", lambda: self.inner.put_if(key, data, match))
