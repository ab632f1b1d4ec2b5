"""`checkpointer key list|add|remove`: the access keys of an encrypted repository.

These run in the CLI process (as root, with the config's storage settings), not in the daemon:
like restic's `key` commands they touch only `keys/` objects, never data, so a running daemon
is not disturbed and no checkpoint is re-encrypted. The S3 bucket is used directly (no spool):
a key change must reach the bucket now or fail.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from checkpointer.cli import rendering as show
from checkpointer.cli.options import common

if TYPE_CHECKING:  # loaded by the key commands only: the others start without them
    from checkpointer.config import Config
    from storage import keyring
    from storage.backends import BlobStore


def _backend(config: Config) -> BlobStore:
    from storage.backends import LocalBlobStore

    if config.storage.backend == "local":
        return LocalBlobStore(config.repository_path)
    from checkpointer.repository.stack import remote_store  # boto3: only when needed

    return remote_store(config, None)


def _open(config: Config) -> tuple[BlobStore, keyring.Opened]:
    from checkpointer.repository.key import RepositoryKeyError, open_codec
    from storage import keyring

    if not config.storage.encryption:
        raise RepositoryKeyError("storage.encryption is false: this repository has no keys")
    backend = _backend(config)
    if keyring.is_new(backend):
        raise RepositoryKeyError(
            f"there is no repository at {backend.describe()} yet: the daemon creates it, "
            "with its first key, when it first starts"
        )
    return backend, open_codec(config, backend, socket.gethostname())


@click.group()
def key() -> None:
    """Access keys of the encrypted repository (several keys open one repository)."""


@key.command("list")
@common(reads_config=True)
def list_keys(config: Config, as_json: bool) -> None:
    """The repository's access keys; `current` is the one this host's config opens it with."""
    from storage import keyring

    backend, opened = _open(config)
    rows = keyring.list_keys(backend, opened)

    def human() -> None:
        table = show.new_table("ID", "KIND", "CREATED (UTC)", "HOST", "CURRENT")
        for r in rows:
            created = r.get("created")
            when = (
                datetime.fromtimestamp(float(created), UTC).strftime("%Y-%m-%d %H:%M:%S")
                if isinstance(created, int | float)
                else "?"
            )
            table.add_row(
                r["id"], str(r.get("kind")), when, str(r.get("host")), "*" if r["current"] else ""
            )
        show.print_table(table)

    show.emit(as_json, rows, human)


@key.command("add")
@common(reads_config=True)
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write a new random key to this file (it must not exist) and add it",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="add a key opened by the passphrase in this file (0600)",
)
def add_key(
    config: Config, as_json: bool, new_key_file: Path | None, passphrase_file: Path | None
) -> None:
    """Add an access key: a new key file, or a passphrase. No data is re-encrypted."""
    if (new_key_file is None) == (passphrase_file is None):
        raise click.UsageError("give one of --new-key-file and --passphrase-file")
    from checkpointer.repository.key import read_secret_file, write_new_key_file
    from storage import keyring

    backend, opened = _open(config)
    if new_key_file is not None:
        secret = write_new_key_file(new_key_file)
    else:
        assert passphrase_file is not None
        secret = read_secret_file(passphrase_file, "passphrase file")
    key_id = keyring.add_key(backend, opened, secret, socket.gethostname())
    if as_json:
        click.echo(json.dumps({"id": key_id, "kind": secret.kind}))
    else:
        click.echo(key_id)


@key.command("remove")
@common(reads_config=True)
@click.argument("key_id")
def remove_key(config: Config, as_json: bool, key_id: str) -> None:
    """Remove an access key: whoever holds only that key can no longer open the repository."""
    from storage import keyring

    backend, opened = _open(config)
    keyring.remove_key(backend, opened, key_id)
    if as_json:
        click.echo(json.dumps({"id": key_id, "removed": True}))
    else:
        click.echo(f"removed key {key_id}")
