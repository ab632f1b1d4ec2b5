"""Which checkpoints a decision may see: the repository's listing, or during an outage only
what this host knows for itself.

The bucket is the truth about which checkpoints exist (docs/fleet.md, R1): the local spool's
cache may still hold a checkpoint another host removed, and misses the ones other hosts took,
so "the newest" read from it can be the wrong one (a migration target would restore the
checkpoint it fetched ahead instead of the final one). While the bucket is unreachable, one
checkpoint is still known to be current without asking it: the newest one this host itself
committed (`last_checkpoint`), if its spool or cache holds it. A restore after a crash during
an outage takes that one; anything else waits for the bucket. (In fleet mode the lease cannot
be confirmed during an outage either, so nothing is restored there until the bucket answers.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storage import Repository
from storage.errors import TransientStorageError
from storage.repository import CheckpointInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listing:
    checkpoints: list[CheckpointInfo]  # newest first
    local_only: str | None = None  # why the bucket's listing could not be had (None: it was)


def checkpoints(repo: Repository, name: str, own_newest: str | None) -> Listing:
    """The repository's checkpoints of `name`; during an outage, `own_newest` alone when this
    host holds it locally; otherwise the outage's TransientStorageError."""
    try:
        return Listing(repo.checkpoints(name))
    except TransientStorageError as e:
        if own_newest is None:
            raise
        mine = [c for c in repo.checkpoints_local(name) if c.id == own_newest]
        if not mine:
            raise
        log.warning(
            "object storage is unreachable (%s): %s can only be restored from %s, the newest "
            "checkpoint this host took, held locally",
            e,
            name,
            own_newest,
        )
        return Listing(mine, f"object storage is unreachable ({e})")


def local_view(repo: Repository, name: str) -> Listing:
    """For `list` during an outage: what this host holds, said to be partial."""
    try:
        return Listing(repo.checkpoints(name))
    except TransientStorageError as e:
        return Listing(
            repo.checkpoints_local(name),
            f"object storage is unreachable ({e}): these are only the checkpoints this "
            "host holds locally",
        )
