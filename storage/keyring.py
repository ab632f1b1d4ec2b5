"""The repository's keys: creating an encrypted repository, opening it with an access key,
adding and removing access keys.

`keys/<id>` objects hold the master key wrapped (storage/access_keys.py); the sealed `config`
object proves that the master key opened is this repository's (a key object planted by
someone with write access to the bucket wraps some other master key: `config` would not
open with it) and records the format.

Creating a repository, crash-safe and race-safe. `config` is the commit point: a repository
exists once its `config` is stored, and its master key is the one that seals that `config`.

1. Write `keys/<new random id>` wrapping a new master key (create-only; the id is fresh, so
   it never collides).
2. Write `config` sealed with that master, create-only: the store decides who creates.
3. Read `config` back. If it opens with our master, we created the repository (this also
   covers a put whose reply was lost and whose retry was told "exists": it was ours). If
   not, another host won: delete our key object (it wraps a master nothing was sealed
   with) and open the winner's repository like any later start.

Why each interleaving is safe:
- kill -9 before 1, or between 1 and 2: there is no `config`, so no repository: the next
  start creates one as in a new bucket. The dead creator's key object stays behind, unused;
  it opens nothing (its master sealed nothing) and is skipped with a warning naming it.
- kill -9 between 2 and 3: the repository is complete (its key was written first).
- two hosts create at once: both write their own key (distinct ids), one `config` put
  wins, the other is told "exists", finds that `config` does not open with its master and
  opens the winner's (it succeeds if both hosts hold the same secret, and otherwise says
  whose key file to copy). Nobody overwrites a `config` or deletes a key that is not its
  own, so a host never adopts or breaks a repository another host is validly creating.
  (With `s3.create_only: false` the store cannot decide; the read-back then only narrows
  the window. Fleet mode needs conditional writes anyway.)

Versions before this one wrote `config` first and the key second: a creator killed between
the two left a `config` no key opens, and every later start refused the bucket. Such a
`config` is replaced when the repository is otherwise empty (no checkpoints, no packs), no
key object that could open it is listed (none, or only ones this host's secret proves
foreign), and it is older than ABANDONED_AFTER (an old creator still alive writes its key
within one put's retries, far less). The replacement is conditional on the version read
(`put_if`), and keys are listed after that read: a host that replaced it wrote its key
first, so a second host either sees that key (and opens the repository) or loses the
conditional write (and opens the winner's). Never two masters.

Key objects are input from whoever can write the bucket: every one is tried (up to MAX_KEYS,
beyond which the start is refused naming the count), a malformed one is skipped with a
warning naming it, and none opening is one WrongKey that says what to check.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from storage.access_keys import (
    AccessSecret,
    MalformedKey,
    WrongKey,
    describe_key,
    new_key_id,
    unwrap,
    wrap,
)
from storage.backends.base import BlobStore
from storage.crypto import Codec, Plain, Sealed, new_master
from storage.errors import (
    BlobExists,
    BlobNotFound,
    ConditionalWritesUnsupported,
    CorruptCheckpoint,
    StorageError,
)
from storage.keys import CONFIG, KEYS, MANIFESTS, PACKS, WPACKS, FileType, key_key, parse_as

log = logging.getLogger(__name__)

MAX_KEY_OBJECT = 4096  # a key object is ~400 bytes: anything bigger was not written by us
MAX_CONFIG = 4096
# A repository has one key object per access key: a handful. Each is tried, and with a
# passphrase each try of a passphrase key costs a scrypt (~0.4 s): 256 is minutes at worst.
MAX_KEYS = 256
# A `config` no key opens, this old (by the store's clock), was left by a creator that died.
ABANDONED_AFTER = 300.0
_FORMAT = 2


class KeyringError(StorageError):
    """The repository's keys or config cannot be used as they are; the message says why and
    what to do."""


class RepositoryNotEncrypted(KeyringError):
    """Checkpoints stored in clear where a key is configured: migrate them first."""


@dataclass(frozen=True)
class Opened:
    codec: Codec
    key_id: str | None  # the access key that opened it (None: not encrypted)
    master: bytes | None = None


@dataclass
class _Tried:
    """What trying every key object found, when none opened `config`."""

    other: list[str] = field(default_factory=list)  # well-formed, another secret's
    foreign: list[str] = field(default_factory=list)  # ours, but another master (orphans)
    malformed: list[str] = field(default_factory=list)


def _key_ids(backend: BlobStore) -> list[str]:
    return sorted(n.id for k in backend.list(KEYS) if (n := parse_as(k, FileType.KEY)))


def _bounded_key_ids(backend: BlobStore) -> list[str]:
    ids = _key_ids(backend)
    if len(ids) > MAX_KEYS:
        raise KeyringError(
            f"the repository at {backend.describe()} has {len(ids)} key objects under keys/, "
            f"more than the {MAX_KEYS} a host tries: a repository has one per access key, so "
            "most were planted or left over. List keys/ in the store (each is a small JSON "
            "object naming the `host` and time it was `created` on), delete the ones no "
            "operator made, then start again"
        )
    return ids


def has_keys(backend: BlobStore) -> bool:
    return bool(_key_ids(backend))


def is_empty(backend: BlobStore) -> bool:
    return not any(any(True for _ in backend.list(p)) for p in (MANIFESTS, WPACKS, PACKS))


def is_new(backend: BlobStore) -> bool:
    """No repository yet: no checkpoints, no packs and no `config` (key objects without a
    `config` are a creation that never committed), or only an abandoned old-style `config`."""
    if not is_empty(backend):
        return False
    return not backend.exists(CONFIG) or (not has_keys(backend) and _config_age_left(backend) <= 0)


def open_repository_codec(
    backend: BlobStore, access: AccessSecret | None, host: str, create: bool = True
) -> Opened:
    """The codec to read and write this repository with.

    No access key: the repository must not be encrypted (legacy, clear objects). An access
    key: the repository must be encrypted and opened by it; an empty repository is
    initialised with it when `create` (see the module's docstring). A key never silently
    reads clear objects.
    """
    if access is None:
        if has_keys(backend):
            raise WrongKey(
                f"the repository at {backend.describe()} is encrypted and no key is "
                "configured: set storage.key_file (or CHECKPOINTER_REPOSITORY_KEY)"
            )
        return Opened(Plain(), None)
    config = _read_config(backend)
    if config is None:
        if not is_empty(backend):
            if has_keys(backend):
                raise KeyringError(
                    f"the repository at {backend.describe()} holds checkpoints and keys but no "
                    "config object: it was deleted; restore it from a backup of the bucket"
                )
            raise RepositoryNotEncrypted(
                f"the repository at {backend.describe()} holds checkpoints stored "
                "unencrypted: set storage.encryption: false to keep using it in clear, or point "
                "storage.path (s3: storage.s3.prefix) at a new, empty location for an encrypted "
                "one (docs/storage.md, Encryption: repositories written in clear)"
            )
        if not create:
            raise KeyringError(f"there is no repository at {backend.describe()} yet")
        return _create(backend, access, host, None)
    blob, version = config
    ids = _bounded_key_ids(backend)  # listed after `config` was read: the module's docstring
    if len(ids) > 16 and access.kind == "passphrase":
        log.warning("%d key objects to try, each passphrase key ~0.4 s", len(ids))
    opened, tried = _try_keys(backend, access, ids, blob)
    if opened is not None:
        return opened
    if not tried.other and is_empty(backend):
        left = _config_age_left(backend)
        if left > 0 or not create:
            when = f"in {left:.0f} s" if left > 0 else "when a daemon starts with its key"
            raise KeyringError(
                f"the repository at {backend.describe()} has a config object but no key that "
                "opens it: a host running a checkpointer older than this one may be creating "
                "it right now. If none is, a creator died there; it is replaced "
                f"automatically {when}, or delete the object `config` from the store and "
                "start again"
            )
        if version is None:
            raise _cannot_replace(backend)
        log.warning("replacing a config object that no key opens (a creator died)")
        return _create(backend, access, host, version)
    raise WrongKey(_none_opens(backend, ids, tried))


def _read_config(backend: BlobStore) -> tuple[bytes, str | None] | None:
    try:
        try:
            blob, version = backend.get_versioned(CONFIG, MAX_CONFIG)
            return blob, version
        except ConditionalWritesUnsupported:
            return backend.get(CONFIG, MAX_CONFIG), None
    except BlobNotFound:
        return None


def _config_age_left(backend: BlobStore) -> float:
    """Seconds until `config` counts as abandoned (inf if the store cannot say its age)."""
    modified = backend.modified(CONFIG)
    return float("inf") if modified is None else modified + ABANDONED_AFTER - time.time()


def _try_keys(
    backend: BlobStore, access: AccessSecret, ids: list[str], config: bytes
) -> tuple[Opened | None, _Tried]:
    tried = _Tried()
    for key_id in ids:
        try:
            master = unwrap(backend.get(key_key(key_id), MAX_KEY_OBJECT), access, key_id)
        except BlobNotFound:
            continue  # removed since the listing
        except (MalformedKey, CorruptCheckpoint) as e:  # CorruptCheckpoint: BlobTooLarge
            log.warning("skipping key object %s: it is not a key (%s)", key_key(key_id), e)
            tried.malformed.append(key_id)
            continue
        if master is None:
            tried.other.append(key_id)
            continue
        codec = Sealed(master)
        if _opens_config(codec, config):
            return Opened(codec, key_id, master), tried
        log.warning(
            "key %s opens with this host's secret but wraps a master key that is not this "
            "repository's (left by a host that lost the race to create it, or died creating "
            "it); skipped. `checkpointer key remove %s` removes it",
            key_id,
            key_id,
        )
        tried.foreign.append(key_id)
    return None, tried


def _none_opens(backend: BlobStore, ids: list[str], tried: _Tried) -> str:
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    skipped = f"; {len(tried.malformed)} malformed, skipped" if tried.malformed else ""
    return (
        f"the repository key opens none of the {len(ids)} key(s) of the repository at "
        f"{backend.describe()} (ids: {shown or 'none'}{skipped}): wrong key file or "
        "passphrase? Copy the key file of a host that opens it (storage.key_file)"
    )


def _opens_config(codec: Sealed, blob: bytes) -> bool:
    """Whether `config` is sealed with this codec's master; KeyringError for a format this
    version does not know (the master is right, the program is too old)."""
    try:
        doc = json.loads(codec.open(CONFIG, blob))
    except CorruptCheckpoint:
        return False
    except ValueError as e:
        raise KeyringError(f"the repository's config object is damaged: {e}") from e
    version = doc.get("version") if isinstance(doc, dict) else None
    if version != _FORMAT:
        raise KeyringError(
            f"repository format {version!r} is not known to this version of checkpointer: "
            "upgrade it"
        )
    return True


def _create(backend: BlobStore, access: AccessSecret, host: str, replace: str | None) -> Opened:
    """Steps 1-3 of the module's docstring; `replace`: the version of an abandoned `config`
    to replace (conditionally), None to create one."""
    master, key_id = new_master(), new_key_id()
    codec = Sealed(master)
    backend.put(key_key(key_id), wrap(master, access, key_id, host))
    sealed = codec.seal(CONFIG, json.dumps({"version": _FORMAT}).encode())
    try:
        if replace is None:
            backend.put(CONFIG, sealed)
        else:
            backend.put_if(CONFIG, sealed, replace)
    except BlobExists:  # PreconditionFailed too: decided below, by what `config` is now
        pass
    except ConditionalWritesUnsupported as e:
        _forget_key(backend, key_id)
        raise _cannot_replace(backend) from e
    current = _read_config(backend)
    if current is not None and _opens_config(codec, current[0]):
        log.warning("created encrypted repository at %s (key %s)", backend.describe(), key_id)
        return Opened(codec, key_id, master)
    _forget_key(backend, key_id)
    log.info("another host created the repository at %s first: opening it", backend.describe())
    try:
        return open_repository_codec(backend, access, host, create=False)
    except WrongKey as e:
        raise WrongKey(
            f"another host created the repository at {backend.describe()} at the same moment, "
            f"with another access key: copy that host's key file here ({e})"
        ) from e


def _cannot_replace(backend: BlobStore) -> KeyringError:
    return KeyringError(
        f"the config object at {backend.describe()} opens with no key (a creator died) and "
        "this store cannot replace it conditionally: make sure no host is starting on it, "
        "delete the object `config` by hand and start again"
    )


def _forget_key(backend: BlobStore, key_id: str) -> None:
    """Our own key object whose master sealed nothing: deleting it is tidy, not needed."""
    try:
        backend.delete(key_key(key_id))
    except StorageError as e:
        log.warning("could not delete the unused key object %s: %s", key_key(key_id), e)


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
            info = describe_key(backend.get(key_key(key_id), MAX_KEY_OBJECT))
        except (BlobNotFound, CorruptCheckpoint):
            continue
        out.append({**info, "id": key_id, "current": key_id == opened.key_id})
    return out
