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
from collections.abc import Callable, Iterable, Iterator

from storage.errors import ConditionalWritesUnsupported

KeyList = list[str]


class BlobStore(ABC):
    """Bytes by key. Keys are '/'-separated relative paths of safe characters."""

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store `data` under `key`, atomically and durably; raise BlobExists if it is taken."""

    def put_pieces(self, key: str, pieces: Callable[[], Iterable[bytes | memoryview]]) -> None:
        """`put` of the concatenation of what `pieces()` yields, called once per attempt. A
        store that writes files writes them a piece at a time, so a big object (a manifest
        is 43 MB at 4 GB of image) is never whole in memory; this default joins them."""
        self.put(key, b"".join(pieces()))

    @abstractmethod
    def get(self, key: str, limit: int | None = None) -> bytes:
        """Return the whole blob; raise BlobNotFound if there is none.

        With `limit`, a blob larger than `limit` bytes raises BlobTooLarge before it is read:
        sizes in a shared bucket are chosen by whoever writes it, and must not make a host
        allocate what they say."""

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        """`get`, into a buffer the caller reuses where the store can: `buffer(n)` returns
        one of at least n bytes. The result may be a view of it, valid until the caller
        reuses it. (A restore reads hundreds of 4 MiB packs; a fresh 4 MiB each was a third
        of its reading time, in page faults.) The default is `get`."""
        return self.get(key, limit)

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        """`length` bytes of a blob from `offset` (fewer where it ends), and the blob's
        whole size; BlobNotFound if there is none. A lazy restore reads a pack's 64 KiB
        segments this way, not the 4 MiB pack. The default reads the whole blob."""
        data = self.get(key)
        return data[offset : offset + length], len(data)

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Yield every key that starts with `prefix`, in no particular order."""

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Yield (key, version) of every blob under `prefix`, each version as `get_versioned`
        would return it, from the listing alone (S3: the ETags of ListObjectsV2, 1,000 keys a
        request). What lets a fleet's hosts see which heartbeats and leases changed without
        reading them (docs/fleet.md, issue 27)."""
        raise ConditionalWritesUnsupported(f"{self.describe()} has no conditional writes")

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; removing a missing key is not an error (deletes are retried)."""

    def needs(self, key: str, needed: KeyList) -> None:
        """The blob about to be put under `key` names the blobs `needed` (a manifest, the
        packs its commit wrote): a store that uploads later (a spool) checks they are still
        there before it sends it. Others have nothing to do."""
        return None

    def handle_records(self, apply: Callable[[str], None]) -> None:
        """Who applies `after_uploads` records (the repository, which writes heads)."""
        self._apply_record = apply

    def apply_record(self, record: str) -> None:
        self._apply_record(record)

    def after_uploads(self, record: str) -> None:
        """Apply `record` once every blob written before it is in the authoritative store:
        at once for a store that writes through; a spool queues it behind its uploads."""
        self.apply_record(record)

    def pending_records(self) -> KeyList:
        """Records queued by `after_uploads` and not applied yet, oldest first."""
        return []

    def list_local(self, prefix: str) -> KeyList:
        """The keys under `prefix` this host holds without asking anyone: for a store that
        is all local, its listing; a spool answers from its cache (partial)."""
        return sorted(self.list(prefix))

    def authoritative(self) -> BlobStore:
        """The store that holds the truth (a spool's remote): what `verify` checks."""
        return self

    def is_pending(self, key: str) -> bool:
        """Whether `key` was written here and has not reached the authoritative store."""
        return False

    def modified(self, key: str) -> float | None:
        """When the blob was stored (Unix time), None if there is none. Garbage collection
        measures a pack's age by this, not by its name: a pack named when its commit began
        can reach the bucket much later (a spool that waited out an outage)."""
        return None

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        """The blob and its version (an ETag); BlobNotFound if there is none."""
        raise ConditionalWritesUnsupported(f"{self.describe()} has no conditional writes")

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        """Write `data` only if the blob is still at version `match` (None: only if there is
        no blob); return the new version. PreconditionFailed if it is not. The one write that
        replaces a blob: leases are renewed and handed over in place, and two hosts racing
        for one are told apart by the store, not by their clocks."""
        raise ConditionalWritesUnsupported(f"{self.describe()} has no conditional writes")

    def server_time(self) -> float | None:
        """The store's clock (Unix time) as one cheap request reports it, None if it reports
        none (a local folder). Fleet mode compares it with this host's clock and refuses to
        run when they differ by more than fleet.clock_skew."""
        return None

    def check(self) -> None:
        """Raise a clear StorageError if the store cannot be used at all (credentials, bucket).

        The default has nothing to check: a local folder fails clearly on first use.
        """
        return None

    def describe(self) -> str:
        """Where the blobs live, for messages and `doctor`."""
        return type(self).__name__
