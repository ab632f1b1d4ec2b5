"""Reading a checkpoint back: what a rebuild and a lazy restore's file reader need from a
repository, as one narrow interface (`PackReader`) and its one implementation over a BlobStore.

A module of its own so that storage/rebuild.py and storage/file_reader.py depend on these few
reads, not on the Repository and everything it does (commits, fencing, retention, pins): they
can be given the repository itself (it implements `PackReader`), or a `StoreReader` over
another store (`verify` reads the bucket's copy past the spool that way).

The errors are the ones a restore reports: a missing pack makes its checkpoint incomplete, a
damaged one corrupt (the restore policy then steps back to the checkpoint before). `home` is
where a pack lives, as the manifest naming it says (`Manifest.pack_home`: its workload, or None
for the legacy flat layout): never guessed from a listing. Everything read is hostile input
until it opens: sizes are capped before reading, manifests validated (storage/manifest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobNotFound, CheckpointNotFound, CorruptCheckpoint
from storage.keys import index_key, manifest_key, pack_key
from storage.manifest import MAX_MANIFEST_BYTES, Manifest, check_workload_name, is_checkpoint_id
from storage.packs import MAX_INDEX_BYTES, MAX_PACK_BYTES, IndexArrays, decode_index_arrays

Buffer = Callable[[int], bytearray]  # see BlobStore.get_into


class PackReader(Protocol):
    """The reads a checkpoint's rebuild (storage/rebuild.py) and a lazy restore's file reader
    (storage/file_reader.py) make. Safe to call from several threads."""

    @property
    def codec(self) -> Codec:
        """Opens what the other methods return raw (`pack_range`'s segments), names chunks,
        and says whether an opened object is authenticated (no per-chunk re-hash then)."""
        ...

    @property
    def concurrency(self) -> int:
        """How many packs a reader may fetch at once."""
        ...

    def read_manifest(self, workload: str, checkpoint_id: str) -> Manifest:
        """The checkpoint's manifest, opened and validated. CheckpointNotFound if there is
        none (or the id is not one), CorruptCheckpoint if it does not open or names another
        checkpoint."""
        ...

    def index_for(self, pack_id: str, home: str | None, where: str) -> IndexArrays:
        """A pack's index, opened; errors name `where` (the checkpoint being read)."""
        ...

    def pack_for(
        self, pack_id: str, home: str | None, where: str, buffer: Buffer | None = None
    ) -> bytes | memoryview:
        """A pack's bytes, opened whole. With `buffer` they are read into the caller's
        buffer, and valid only until that buffer is reused."""
        ...

    def pack_range(
        self, pack_id: str, home: str | None, offset: int, length: int
    ) -> tuple[bytes, int]:
        """`length` stored bytes of a pack from `offset`, as stored (not opened: the caller
        opens them a segment at a time with `codec`), and the stored pack's size.
        BlobNotFound if there is no such pack."""
        ...


class StoreReader:
    """`PackReader` over one BlobStore, opened with `codec`."""

    def __init__(self, backend: BlobStore, codec: Codec, concurrency: int) -> None:
        self.backend = backend
        self.codec = codec
        self.concurrency = concurrency

    def read_manifest(self, workload: str, checkpoint_id: str) -> Manifest:
        check_workload_name(workload)
        if not is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFound(
                f"{checkpoint_id!r} is not a checkpoint id; "
                f"see `checkpointer list {workload}` for the ids"
            )
        key = manifest_key(workload, checkpoint_id)
        where = f"checkpoint {checkpoint_id} of {workload}"
        try:
            raw = self.codec.open(key, self.backend.get(key, MAX_MANIFEST_BYTES))
        except BlobNotFound as e:
            raise CheckpointNotFound(
                f"workload {workload} has no checkpoint {checkpoint_id}; "
                f"see `checkpointer list {workload}`"
            ) from e
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where}: {e}") from e
        manifest = Manifest.parse(raw, where)
        if manifest.id != checkpoint_id or manifest.workload != workload:
            raise CorruptCheckpoint(
                f"checkpoint {checkpoint_id} of {workload}: manifest names "
                f"{manifest.workload}/{manifest.id}"
            )
        return manifest

    def read_index(self, pack_id: str, home: str | None) -> IndexArrays:
        """A pack's index, with the store's and the codec's own errors (BlobNotFound...)."""
        key = index_key(pack_id, home)
        raw = self.codec.open(key, self.backend.get(key, MAX_INDEX_BYTES))
        return decode_index_arrays(raw, key)

    def index_for(self, pack_id: str, home: str | None, where: str) -> IndexArrays:
        try:
            return self.read_index(pack_id, home)
        except BlobNotFound as e:
            raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where} is corrupt: {e}") from e

    def pack_for(
        self, pack_id: str, home: str | None, where: str, buffer: Buffer | None = None
    ) -> bytes | memoryview:
        key = pack_key(pack_id, home)
        try:
            blob = (
                self.backend.get(key, MAX_PACK_BYTES)
                if buffer is None
                else self.backend.get_into(key, buffer, MAX_PACK_BYTES)
            )
            return self.codec.open_pack(key, blob)
        except BlobNotFound as e:
            raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where} is corrupt: {e}") from e

    def pack_range(
        self, pack_id: str, home: str | None, offset: int, length: int
    ) -> tuple[bytes, int]:
        return self.backend.get_range(pack_key(pack_id, home), offset, length)


__all__ = ["Buffer", "PackReader", "StoreReader"]
