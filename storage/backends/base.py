"""The blob-store interface every backend implements.

What the repository relies on, and so what every backend must guarantee:

- Atomic puts: a reader sees the whole blob or no blob, never a prefix of it. The manifest of a
  checkpoint is its commit point, so this is what makes a half-written checkpoint invisible.
- Read after write: once `put` returns, `get`, `exists` and `list` see the blob.
- Durability: once `put` returns, the blob survives a crash of this host.
- Create only: a key is written once; `put` of an existing key raises `BlobExists`. Some
  S3-compatible stores are only eventually consistent on overwrite, so we never overwrite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator


class BlobStore(ABC):
    """Bytes by key. Keys are '/'-separated relative paths of safe characters."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically and durably; raise BlobExists if it is taken."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole blob; raise BlobNotFound if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Yield every key that starts with `prefix`, in no particular order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; removing a missing key is not an error (deletes are retried)."""

    def check(self) -> None:
        """Raise a clear StorageError if the store cannot be used at all (credentials, bucket).

        The default has nothing to check: a local folder fails clearly on first use.
        """
        return None

    def describe(self) -> str:
        """Where the blobs live, for messages and `doctor`."""
        return type(self).__name__
