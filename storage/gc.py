"""Garbage collection and spool shedding: removing packs no checkpoint needs.

Outside the repository's read and write paths (kopia keeps blob GC in its maintenance package):
both plan what goes, then delete. A plan is built under the repository's exclusive lock, so no
commit of this process runs meanwhile; across processes and hosts, a pack younger than the
grace period is never collected (it may belong to a commit whose manifest is not written yet),
and a manifest that cannot be read stops collection rather than counting as referencing
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from storage import keys
from storage.errors import StorageError
from storage.keys import FileType, index_key, manifest_key, pack_key
from storage.packs import pack_created
from storage.repository import Repository


@dataclass
class GcReport:
    referenced_packs: int = 0
    deleted_packs: list[str] = field(default_factory=list)
    kept_young: int = 0  # unreferenced but younger than the grace period (maybe in flight)


def collect_garbage(
    repo: Repository, dry_run: bool = False, grace: float | None = None
) -> GcReport:
    """Delete packs no manifest references and older than the grace period.

    The index goes first, then the pack (references before data): a reader never finds an
    index naming a missing pack. Raises CorruptCheckpoint, deleting nothing, if a manifest
    cannot be read.
    """
    grace = repo.gc_grace if grace is None else grace
    report = GcReport()
    with repo.gc_lock.exclusive():
        referenced = repo.referenced_packs(strict=True)
        report.referenced_packs = len(referenced)
        cutoff = time.time() - grace
        present = {
            n.id
            for k in repo.backend.list(keys.PACKS)
            if (n := keys.parse(k)) and n.type in (FileType.PACK, FileType.INDEX)
        }
        doomed = set()
        for pid in sorted(present - referenced):
            if pack_created(pid) > cutoff or _stored_after(repo, pid, cutoff):
                report.kept_young += 1
                continue
            doomed.add(pid)
        report.deleted_packs = sorted(doomed)
        if dry_run or not doomed:
            return report
        repo.forget_packs(doomed)
        for pid in sorted(doomed):
            repo.backend.delete(index_key(pid))
            repo.backend.delete(pack_key(pid))
    return report


def _stored_after(repo: Repository, pack_id: str, cutoff: float) -> bool:
    """A pack named long ago may have reached the store only now (its host's spool waited
    out an outage, and its manifest is next in line): its age is when it was stored."""
    for key in (pack_key(pack_id), index_key(pack_id)):
        when = repo.backend.modified(key)
        if when is not None and when > cutoff:
            return True
    return False


def shed(
    repo: Repository,
    pending: list[str],
    discard: Callable[[set[str]], None],
    backlog: Callable[[], int],
    max_backlog: int,
) -> list[str]:
    """The spool is over `max_backlog`: drop the oldest checkpoints not yet uploaded.

    `pending` are the keys not yet uploaded, oldest first. A workload's newest checkpoint is
    never dropped. Packs go with a dropped checkpoint only if no checkpoint still waiting
    references them (what was uploaded cannot reference what was not: the queue is in order).
    Returns the dropped checkpoint ids.
    """
    dropped: list[str] = []
    with repo.gc_lock.exclusive():
        waiting = [n for k in pending if (n := keys.parse_as(k, FileType.MANIFEST))]
        pending_packs = {n.id for k in pending if (n := keys.parse(k)) and n.type is FileType.PACK}
        newest = {m.workload: m for m in waiting}
        for m in waiting:
            if backlog() <= max_backlog:
                break
            if newest[m.workload] == m:
                continue
            dropped.append(m.id)
            still_needed: set[str] = set()
            for other in waiting:
                if other.id in dropped:
                    continue
                try:
                    still_needed.update(repo.packs_of(other.workload, other.id))
                except StorageError:
                    continue
            try:
                mine = set(repo.packs_of(m.workload, m.id))
            except StorageError:
                mine = set()
            gone = (mine & pending_packs) - still_needed
            repo.forget_packs(gone)
            keys_gone = {manifest_key(m.workload, m.id)}
            for pid in gone:
                keys_gone |= {pack_key(pid), index_key(pid)}
            discard({k for k in pending if k in keys_gone})
    return dropped
