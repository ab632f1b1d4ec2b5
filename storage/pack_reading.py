"""Reading one pack or pack index, opened by the codec, with the errors a restore reports: a
missing pack makes its checkpoint incomplete, a damaged one corrupt (the restore policy then
steps back to the checkpoint before).

`home` is where the pack lives, as the manifest naming it says (`Manifest.pack_home`: its
workload, or None for the legacy flat layout): never guessed from a listing."""

from __future__ import annotations

from collections.abc import Callable

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobNotFound, CorruptCheckpoint
from storage.keys import index_key, pack_key
from storage.packs import MAX_INDEX_BYTES, MAX_PACK_BYTES, IndexArrays, decode_index_arrays


def read_index(backend: BlobStore, codec: Codec, pack_id: str, home: str | None) -> IndexArrays:
    key = index_key(pack_id, home)
    raw = codec.open(key, backend.get(key, MAX_INDEX_BYTES))
    return decode_index_arrays(raw, key)


def index_for(
    backend: BlobStore, codec: Codec, pack_id: str, home: str | None, where: str
) -> IndexArrays:
    try:
        return read_index(backend, codec, pack_id, home)
    except BlobNotFound as e:
        raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{where} is corrupt: {e}") from e


def pack_for(
    backend: BlobStore,
    codec: Codec,
    pack_id: str,
    home: str | None,
    where: str,
    buffer: Callable[[int], bytearray] | None = None,
) -> bytes | memoryview:
    """A pack's bytes, opened. With `buffer` (see BlobStore.get_into) it is read into the
    caller's buffer, and the result is valid only until that buffer is reused."""
    key = pack_key(pack_id, home)
    try:
        blob = (
            backend.get(key, MAX_PACK_BYTES)
            if buffer is None
            else backend.get_into(key, buffer, MAX_PACK_BYTES)
        )
        return codec.open_pack(key, blob)
    except BlobNotFound as e:
        raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{where} is corrupt: {e}") from e
