"""Where the repository's access key comes from, checked before it is trusted.

In order: `CHECKPOINTER_REPOSITORY_KEY` (the key file's text) or
`CHECKPOINTER_REPOSITORY_PASSPHRASE` in the environment; a systemd credential named
`repository.key` (`LoadCredential=repository.key:/path` puts it in `$CREDENTIALS_DIRECTORY`);
`storage.passphrase_file`; `storage.key_file`. A key file must be a regular file owned by the
daemon's user with no group or other permission: a key another local user could read or
replace is refused, as ssh refuses a private key with loose permissions.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from checkpointer.config import Config
from checkpointer.errors import CheckpointerError
from storage import keyring
from storage.access_keys import AccessSecret, WrongKey
from storage.backends.base import BlobStore
from storage.errors import StorageError

log = logging.getLogger(__name__)

ENV_KEY = "CHECKPOINTER_REPOSITORY_KEY"
ENV_PASSPHRASE = "CHECKPOINTER_REPOSITORY_PASSPHRASE"
CREDENTIAL = "repository.key"
_MAX_KEY_FILE = 4096


class RepositoryKeyError(CheckpointerError):
    """The access key is missing, unreadable, loosely protected or wrong."""


@dataclass(frozen=True)
class KeySource:
    secret: AccessSecret
    where: str


def read_secret_file(path: Path, kind: str) -> AccessSecret:
    """A key or passphrase file, refused unless only its owner (us) can read or change it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RepositoryKeyError(f"cannot open {kind} {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RepositoryKeyError(f"{kind} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise RepositoryKeyError(
                f"{kind} {path} is owned by uid {st.st_uid}, not by the daemon's user "
                f"({os.geteuid()}): `chown {os.geteuid()} {path}`"
            )
        if st.st_mode & 0o077:
            raise RepositoryKeyError(
                f"{kind} {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users could "
                f"read it; `chmod 600 {path}`"
            )
        raw = f.read(_MAX_KEY_FILE + 1)
    if len(raw) > _MAX_KEY_FILE:
        raise RepositoryKeyError(f"{kind} {path} is too large to be one")
    if kind == "passphrase file":
        text = raw.decode(errors="replace").rstrip("\n")
        if not text:
            raise RepositoryKeyError(f"passphrase file {path} is empty")
        return AccessSecret(text.encode(), "passphrase")
    try:
        return AccessSecret.from_file_text(raw.decode(), str(path))
    except (WrongKey, UnicodeDecodeError) as e:
        raise RepositoryKeyError(str(e)) from e


def find_secret(config: Config) -> KeySource | None:
    """The configured access secret, or None if the key file does not exist (yet)."""
    env_key, env_pass = os.environ.get(ENV_KEY), os.environ.get(ENV_PASSPHRASE)
    if env_key:
        try:
            return KeySource(AccessSecret.from_file_text(env_key, f"${ENV_KEY}"), f"${ENV_KEY}")
        except WrongKey as e:
            raise RepositoryKeyError(str(e)) from e
    if env_pass:
        return KeySource(AccessSecret(env_pass.encode(), "passphrase"), f"${ENV_PASSPHRASE}")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL).exists():
        path = Path(creds) / CREDENTIAL
        return KeySource(read_secret_file(path, "key file"), f"systemd credential {path}")
    s = config.storage
    if s.passphrase_file is not None:
        try:
            return KeySource(
                read_secret_file(s.passphrase_file, "passphrase file"), str(s.passphrase_file)
            )
        except FileNotFoundError as e:
            raise RepositoryKeyError(
                f"storage.passphrase_file {s.passphrase_file} does not exist"
            ) from e
    try:
        return KeySource(read_secret_file(s.key_file, "key file"), str(s.key_file))
    except FileNotFoundError:
        return None


def write_new_key_file(path: Path) -> AccessSecret:
    """A new random access key in a new file (never over an existing one), 0600."""
    secret = AccessSecret.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as e:
        raise RepositoryKeyError(f"{path} already exists: refusing to overwrite a key") from e
    with os.fdopen(fd, "w") as f:
        f.write(secret.file_text())
        f.flush()
        os.fsync(f.fileno())
    return secret


def open_codec(
    config: Config, backend: BlobStore, host: str, create: bool = True
) -> keyring.Opened:
    """Open the repository as the config says; a new, empty repository is created encrypted,
    with a new key file, on first use (unless not `create`: a local copy of the keys, which
    must never create or replace a repository's config). Every refusal is one
    RepositoryKeyError naming the fix.
    """
    try:
        if not config.storage.encryption:
            return keyring.open_repository_codec(backend, None, host)
        source = find_secret(config)
        if source is None:
            key_file = config.storage.key_file
            if not keyring.is_new(backend):
                if not keyring.has_keys(backend):  # checkpoints in clear: say that, not "key"
                    keyring.open_repository_codec(backend, AccessSecret.generate(), host, False)
                raise RepositoryKeyError(
                    f"the repository at {backend.describe()} already holds checkpoints or keys "
                    f"and the key file {key_file} does not exist: copy the key file from a host "
                    "that uses this repository (or set storage.key_file to where it is)"
                )
            secret = write_new_key_file(key_file)
            log.warning(
                "new repository: its access key was written to %s; keep a copy off this host, "
                "without it the checkpoints cannot be read",
                key_file,
            )
            source = KeySource(secret, str(key_file))
        opened = keyring.open_repository_codec(backend, source.secret, host, create)
    except RepositoryKeyError:
        raise
    except (WrongKey, keyring.KeyringError) as e:
        raise RepositoryKeyError(str(e)) from e
    log.info("repository opened with key %s from %s", opened.key_id, source.where)
    return opened


__all__ = ["RepositoryKeyError", "StorageError", "find_secret", "open_codec"]
