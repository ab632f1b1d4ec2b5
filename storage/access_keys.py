"""Access keys: the master key wrapped by a secret the operator keeps (restic's key files).

Each `keys/<id>` object holds the repository's master key sealed (AES-256-GCM, the object's
name as associated data) with a key-encryption key derived from an access secret: a key file
(256 random bits, no stretching needed) or a passphrase (scrypt). Several access keys open one
repository; adding or removing one never re-encrypts data.

A key object is input from whoever can write the bucket, so `unwrap` tells three outcomes
apart: the master key (this secret opens it), None (a well-formed key of another secret), or
MalformedKey (not a key object this program writes: skipped with a warning, never a crash).
The scrypt parameters are stored with each key and bounded before use: a planted key object
must not make a host allocate gigabytes or spend minutes on one try.

The keyring's half that deals with one key object, byte by byte; storage/keyring.py is the
other half, the repository's set of keys (create, open, add, remove). Kept apart from the
codec (storage/crypto.py), which only ever sees the master key unwrapped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import StorageError
from storage.keys import key_key

_WRAP_CONTEXT = "checkpointer 2026-11 key wrap"
_NONCE = 12
_TAG = 16
_KINDS = ("file", "passphrase")

# scrypt for new passphrase keys: N=2^17, r=8 is 128 MiB and ~0.4 s per try here, the cost
# OWASP recommends; 2^15 (32 MiB, ~0.1 s: keys written before) let a bucket reader test four
# times as many passphrases per second offline. Keys keep the parameters they were made with.
SCRYPT = {"n": 2**17, "r": 8, "p": 1}
# What a stored key may ask for: twice today's memory (a future version may raise N once),
# never more. A planted N=2^20, r=32 would be 4 GiB.
_SCRYPT_MAX_MEMORY = 256 << 20
_SCRYPT_MAX_P = 4


class WrongKey(StorageError):
    """The access key opens none of the repository's keys (or is not a key at all)."""


class MalformedKey(ValueError):
    """A `keys/<id>` object that is not a key object this program writes (planted, damaged,
    or from a future format): it opens nothing and is skipped."""


@dataclass(frozen=True)
class AccessSecret:
    """What the operator holds: 32 random bytes (a key file), or a passphrase."""

    secret: bytes
    kind: str  # "file" or "passphrase"

    @classmethod
    def generate(cls) -> AccessSecret:
        return cls(secrets.token_bytes(32), "file")

    @classmethod
    def from_file_text(cls, text: str, where: str) -> AccessSecret:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        try:
            raw = base64.b64decode(lines[0], validate=True) if len(lines) == 1 else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise WrongKey(
                f"{where} does not hold a repository key (one line of base64, 32 bytes); "
                "make one with `checkpointer key add --new-key-file FILE`"
            )
        return cls(raw, "file")

    def file_text(self) -> str:
        return (
            "# checkpointer repository access key: keep it secret, keep a copy off this host.\n"
            + base64.b64encode(self.secret).decode()
            + "\n"
        )

    def kek(self, salt: bytes, params: dict[str, int]) -> bytes:
        """The key-encryption key; `params` (scrypt's n, r, p) must be `_checked` first."""
        if self.kind == "passphrase":
            n, r, p = params["n"], params["r"], params["p"]
            # OpenSSL counts 128*r*(n+2) + 128*r*p bytes (plus a little) against maxmem.
            maxmem = 128 * r * (n + 2 + p) + (1 << 20)
            return hashlib.scrypt(self.secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=32)
        return blake3.blake3(salt + self.secret, derive_key_context=_WRAP_CONTEXT).digest()


def wrap(master: bytes, access: AccessSecret, key_id: str, host: str) -> bytes:
    """A `keys/<id>` object: the master key sealed with the access secret's wrapping key."""
    salt = secrets.token_bytes(16)
    params = dict(SCRYPT) if access.kind == "passphrase" else {}
    nonce = secrets.token_bytes(_NONCE)
    wrapped = AESGCM(access.kek(salt, params)).encrypt(nonce, master, key_key(key_id).encode())
    doc: dict[str, Any] = {
        "version": 1,
        "id": key_id,
        "kind": access.kind,
        "created": time.time(),
        "host": host,
        "salt": base64.b64encode(salt).decode(),
        "kdf": params,
        "wrapped": base64.b64encode(nonce + wrapped).decode(),
    }
    return json.dumps(doc).encode()


@dataclass(frozen=True)
class _KeyObject:
    kind: str
    salt: bytes
    kdf: dict[str, int]
    wrapped: bytes


def _parse(blob: bytes, key_id: str) -> _KeyObject:
    """The fields of a key object, each checked for type and size; MalformedKey otherwise."""
    try:
        doc = json.loads(blob)
    except ValueError as e:
        raise MalformedKey(f"not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise MalformedKey(f"a JSON {type(doc).__name__}, not an object")
    kind, salt, wrapped, kdf = doc.get("kind"), doc.get("salt"), doc.get("wrapped"), doc.get("kdf")
    if kind not in _KINDS:
        raise MalformedKey(f"kind {kind!r} is not one of {', '.join(_KINDS)}")
    if doc.get("id") != key_id:
        raise MalformedKey(f"it names itself {doc.get('id')!r}")
    if not isinstance(salt, str) or not isinstance(wrapped, str) or not isinstance(kdf, dict):
        raise MalformedKey("salt, wrapped or kdf missing or of the wrong type")
    try:
        raw_salt = base64.b64decode(salt, validate=True)
        raw = base64.b64decode(wrapped, validate=True)
    except ValueError as e:
        raise MalformedKey(f"salt or wrapped is not base64 ({e})") from e
    if len(raw) != _NONCE + 32 + _TAG or not 8 <= len(raw_salt) <= 64:
        raise MalformedKey("salt or wrapped key of the wrong length")
    return _KeyObject(kind, raw_salt, _checked(kdf) if kind == "passphrase" else {}, raw)


def _checked(kdf: dict[str, Any]) -> dict[str, int]:
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not (type(n) is int and type(r) is int and type(p) is int):  # not bool, not float
        raise MalformedKey(f"scrypt parameters {kdf!r} are not integers")
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= _SCRYPT_MAX_P:
        raise MalformedKey(f"scrypt parameters n={n} r={r} p={p} are not valid")
    if 128 * r * n > _SCRYPT_MAX_MEMORY:
        raise MalformedKey(
            f"scrypt parameters n={n} r={r} need {128 * r * n >> 20} MiB, more than the "
            f"{_SCRYPT_MAX_MEMORY >> 20} MiB a key may ask for"
        )
    return {"n": n, "r": r, "p": p}


def unwrap(blob: bytes, access: AccessSecret, key_id: str) -> bytes | None:
    """The master key if `access` opens this key object; None if it is another secret's.
    MalformedKey if the object is not a key object at all (the caller skips it and says so)."""
    key = _parse(blob, key_id)
    if key.kind != access.kind:
        return None
    try:
        return AESGCM(access.kek(key.salt, key.kdf)).decrypt(
            key.wrapped[:_NONCE], key.wrapped[_NONCE:], key_key(key_id).encode()
        )
    except InvalidTag:
        return None


def describe_key(blob: bytes) -> dict[str, Any]:
    """What `key list` shows of a key object (no secret in it)."""
    try:
        doc = json.loads(blob)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return {"id": None, "kind": "damaged", "created": None, "host": None}
    return {k: doc.get(k) for k in ("id", "kind", "created", "host")}


def new_key_id() -> str:
    return f"{int(time.time()):08x}{secrets.token_hex(4)}"
