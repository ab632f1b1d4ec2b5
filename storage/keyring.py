"""The repository's keys: creating an encrypted repository, opening it with an access key,
adding and removing access keys.

`keys/<id>` objects hold the master key wrapped (storage/crypto.py); the sealed `config`
object proves that the master key opened is this repository's (a key object planted by
someone with write access to the bucket wraps some other master key: `config` would not
open with it) and records the format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from storage.backends.base import BlobStore
from storage.crypto import (
    AccessSecret,
    Codec,
    Plain,
    Sealed,
    WrongKey,
    describe_key,
    new_key_id,
    new_master,
    unwrap,
    wrap,
)
from storage.errors import BlobExists, BlobNotFound, CorruptCheckpoint, StorageError
from storage.keys import CONFIG, KEYS, MANIFESTS, PACKS, FileType, key_key, parse_as

log = logging.getLogger(__name__)

MAX_KEY_OBJECT = 4096  # a key object is ~400 bytes: anything bigger was not written by us
MAX_KEYS = 64


class RepositoryNotEncrypted(StorageError):
    """Checkpoints stored in clear where a key is configured: migrate them first."""


@dataclass(frozen=True)
class Opened:
    codec: Codec
    key_id: str | None  # the access key that opened it (None: not encrypted)
    master: bytes | None = None


def _key_ids(backend: BlobStore) -> list[str]:
    ids = [n.id for k in backend.list(KEYS) if (n := parse_as(k, FileType.KEY))]
    return sorted(ids)[:MAX_KEYS]


def _get_small(backend: BlobStore, key: str, limit: int) -> bytes:
    return backend.get(key, limit)


def has_keys(backend: BlobStore) -> bool:
    return bool(_key_ids(backend))


def is_new(backend: BlobStore) -> bool:
    """Nothing stored yet: no keys, no config, no checkpoints, no packs."""
    return not _key_ids(backend) and not backend.exists(CONFIG) and is_empty(backend)


def is_empty(backend: BlobStore) -> bool:
    return not any(True for _ in backend.list(MANIFESTS)) and not any(
        True for _ in backend.list(PACKS)
    )


def open_repository_codec(
    backend: BlobStore, access: AccessSecret | None, host: str, create: bool = True
) -> Opened:
    """The codec to read and write this repository with.

    No access key: the repository must not be encrypted (legacy, clear objects). An access
    key: the repository must be encrypted and opened by it; an empty repository is
    initialised with it when `create`. A key never silently reads clear objects.
    """
    ids = _key_ids(backend)
    if access is None:
        if ids:
            raise WrongKey(
                f"the repository at {backend.describe()} is encrypted and no key is "
                "configured: set storage.key_file (or CHECKPOINTER_REPOSITORY_KEY)"
            )
        return Opened(Plain(), None)
    if not ids:
        if not is_empty(backend):
            raise RepositoryNotEncrypted(
                f"the repository at {backend.describe()} holds checkpoints stored "
                "unencrypted: set storage.encryption: false to keep using it in clear, or point "
                "storage.path (s3: storage.s3.prefix) at a new, empty location for an encrypted "
                "one (README: Encryption, repositories written in clear)"
            )
        if not create:
            raise StorageError(f"the repository at {backend.describe()} has no keys yet")
        return _initialise(backend, access, host)
    for key_id in ids:
        try:
            blob = _get_small(backend, key_key(key_id), MAX_KEY_OBJECT)
        except (BlobNotFound, CorruptCheckpoint):
            continue
        master = unwrap(blob, access, key_id)
        if master is None:
            continue
        codec = Sealed(master)
        try:
            _check_config(backend, codec)
        except CorruptCheckpoint as e:
            log.error("key %s opens a master key that is not this repository's: %s", key_id, e)
            continue
        return Opened(codec, key_id, master)
    raise WrongKey(
        f"the repository key opens none of the {len(ids)} key(s) of the repository at "
        f"{backend.describe()} (ids: {', '.join(ids)}): wrong key file or passphrase?"
    )


def _initialise(backend: BlobStore, access: AccessSecret, host: str) -> Opened:
    master = new_master()
    codec = Sealed(master)
    key_id = new_key_id()
    try:
        backend.put(CONFIG, codec.seal(CONFIG, json.dumps({"version": 2}).encode()))
    except BlobExists as e:
        raise StorageError(
            f"another host is initialising the repository at {backend.describe()}; "
            "start again in a moment"
        ) from e
    backend.put(key_key(key_id), wrap(master, access, key_id, host))
    log.warning("created encrypted repository at %s (key %s)", backend.describe(), key_id)
    return Opened(codec, key_id, master)


def _check_config(backend: BlobStore, codec: Sealed) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(codec.open(CONFIG, _get_small(backend, CONFIG, 4096)))
    except BlobNotFound as e:
        raise CorruptCheckpoint("the repository's config object is missing") from e
    except ValueError as e:
        raise CorruptCheckpoint(f"the repository's config object is damaged: {e}") from e
    if doc.get("version") != 2:
        raise CorruptCheckpoint(f"repository format {doc.get('version')!r} is not known here")
    return doc


def add_key(backend: BlobStore, opened: Opened, access: AccessSecret, host: str) -> str:
    if opened.master is None:
        raise StorageError("the repository is not encrypted: it has no keys to add to")
    key_id = new_key_id()
    backend.put(key_key(key_id), wrap(opened.master, access, key_id, host))
    return key_id


def remove_key(backend: BlobStore, opened: Opened, key_id: str) -> None:
    ids = _key_ids(backend)
    if key_id not in ids:
        raise StorageError(f"the repository has no key {key_id!r} (keys: {', '.join(ids)})")
    if ids == [key_id]:
        raise StorageError(f"{key_id} is the repository's last key: add another one first")
    if key_id == opened.key_id:
        raise StorageError(
            f"{key_id} is the key this host opened the repository with: switch this host to "
            "another key first (storage.key_file), then remove it"
        )
    backend.delete(key_key(key_id))


def list_keys(backend: BlobStore, opened: Opened) -> list[dict[str, Any]]:
    out = []
    for key_id in _key_ids(backend):
        try:
            info = describe_key(_get_small(backend, key_key(key_id), MAX_KEY_OBJECT))
        except (BlobNotFound, CorruptCheckpoint):
            continue
        out.append({**info, "id": key_id, "current": key_id == opened.key_id})
    return out
