"""Pins: checkpoints retention must keep, one small sealed object each (`pins/<workload>/<id>`)."""

from __future__ import annotations

import contextlib

from storage import keys
from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobExists, BlobNotFound, CheckpointNotFound, CorruptCheckpoint
from storage.keys import FileType, pin_key
from storage.manifest import check_workload_name, is_checkpoint_id

_MAX_PIN_BYTES = 4096


def pinned(backend: BlobStore, codec: Codec, workload: str) -> set[str]:
    out = set()
    for key in backend.list(keys.pins_of(workload)):
        name = keys.parse_as(key, FileType.PIN)
        if name is None or name.workload != workload:
            continue
        try:
            codec.open(key, backend.get(key, _MAX_PIN_BYTES))
        except (BlobNotFound, CorruptCheckpoint):
            continue
        out.add(name.id)
    return out


def pin(backend: BlobStore, codec: Codec, workload: str, checkpoint_id: str) -> None:
    key = pin_key(workload, checkpoint_id)
    with contextlib.suppress(BlobExists):
        backend.put(key, codec.seal(key, b""))


def unpin(backend: BlobStore, workload: str, checkpoint_id: str) -> None:
    check_workload_name(workload)
    if not is_checkpoint_id(checkpoint_id):
        raise CheckpointNotFound(f"{checkpoint_id!r} is not a checkpoint id")
    backend.delete(pin_key(workload, checkpoint_id))
