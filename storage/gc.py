"""Garbage collection and spool shedding: removing packs no checkpoint needs.

Outside the repository's read and write paths (kopia keeps blob GC in its maintenance package):
both plan what goes, then delete. A plan is built under the repository's exclusive lock, so no
commit of this process runs meanwhile; across processes and hosts, a pack younger than the
grace period is never collected (it may belong to a commit whose manifest is not written yet),
and a manifest that cannot be read stops collection of what it may reference rather than
counting as referencing nothing.

Per workload, by its owner (docs/fleet.md, R3): a workload's packs live under its own prefix
(`wpacks/<workload>/`, storage/keys.py) and only its own manifests reference them, so its GC
lists `manifests/<workload>/` and `wpacks/<workload>/` and reads only its own manifests: work
proportional to the host's own workloads, whatever the fleet holds. A host collects the
workloads it owns (the engine says which: checkpointer/engine/maintenance.py).

The legacy flat layout (`packs/`, written before packs belonged to a workload, and possibly
shared between workloads) is collected as before, from every manifest of the repository,
while it holds anything: the first pass that finds `packs/` empty marks it so for the process
(`Repository.flat_layout_empty`), and from then on the legacy pass costs nothing. Nothing
writes flat packs any more and no new manifest references one, so the flat packs referenced
only shrink: collecting them races no commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from storage import keys
from storage.errors import StorageError
from storage.keys import FileType, index_key, manifest_key
from storage.manifest import check_workload_name
from storage.packs import pack_created
from storage.repository import Repository

LEGACY = "(legacy flat layout)"  # the scope of the legacy pass in GcReport.skipped


@dataclass
class GcReport:
    referenced_packs: int = 0
    deleted_packs: list[str] = field(default_factory=list)
    kept_young: int = 0  # unreferenced but younger than the grace period (maybe in flight)
    workloads: list[str] = field(default_factory=list)  # those collected
    legacy_deleted: int = 0  # of deleted_packs, flat ones
    # Scopes not collected, with why: a workload (or LEGACY) with a manifest that cannot be
    # read, whose packs are therefore unknown. Nothing of that scope was deleted.
    skipped: dict[str, str] = field(default_factory=dict)

    def problem(self) -> str | None:
        """One message for the scopes skipped (None if none was): what to do about them."""
        if not self.skipped:
            return None
        first = next(iter(self.skipped.values()))
        more = len(self.skipped) - 1
        return (
            f"garbage collection skipped {', '.join(sorted(self.skipped))}: {first}"
            + (f" (and {more} more)" if more else "")
            + "; run `checkpointer verify` on them, and remove the ones that are damaged "
            "or not this repository's"
        )


def collect_garbage(
    repo: Repository,
    workloads: Iterable[str],
    dry_run: bool = False,
    grace: float | None = None,
    legacy: bool = True,
) -> GcReport:
    """Delete the packs of `workloads` (those this host owns) that none of their manifests
    references and that are older than the grace period; then, with `legacy` and while the
    legacy flat layout holds anything, the flat packs no manifest references.

    The index goes first, then the pack (references before data): a reader never finds an
    index naming a missing pack. A scope with a manifest that cannot be read is skipped,
    deleting nothing of it (`GcReport.skipped`, `GcReport.problem`); an unreachable store
    raises StorageError.
    """
    grace = repo.gc_grace if grace is None else grace
    report = GcReport()
    for workload in sorted(set(workloads)):
        check_workload_name(workload)
        with repo.gc_lock.exclusive():
            _collect_workload(repo, workload, repo.clock.wall() - grace, dry_run, report)
    if legacy and not repo.flat_layout_empty:
        with repo.gc_lock.exclusive():
            _collect_flat(repo, repo.clock.wall() - grace, dry_run, report)
    return report


def _collect_workload(
    repo: Repository, workload: str, cutoff: float, dry_run: bool, report: GcReport
) -> None:
    """One workload's pass: its manifests, then its prefix (a commit between the two writes
    packs that are young, hence kept)."""
    refs = repo.references(keys.manifests_of(workload))
    if refs.unreadable:
        report.skipped[workload] = _unreadable(refs.unreadable)
        return
    referenced = refs.under(workload)
    present = _listed_packs(repo, keys.wpacks_of(workload), workload)
    doomed = _doomed(repo, present - referenced, workload, cutoff, report)
    report.workloads.append(workload)
    report.referenced_packs += len(referenced)
    report.deleted_packs += sorted(doomed)
    if dry_run or not doomed:
        return
    repo.dedup.forget_for(workload, doomed)
    _delete(repo, doomed, workload)


def _collect_flat(repo: Repository, cutoff: float, dry_run: bool, report: GcReport) -> None:
    """The legacy pass: flat packs no manifest of the repository references."""
    present = _listed_packs(repo, keys.PACKS, "")
    if not present:
        repo.flat_layout_empty = True  # this version never writes there: never listed again
        return
    if all(pack_created(p) > cutoff for p in present):
        return  # nothing old enough to go: the manifests need not be read
    refs = repo.flat_references()
    if refs.unreadable:
        report.skipped[LEGACY] = _unreadable(refs.unreadable)
        return
    referenced = refs.under(None)
    doomed = _doomed(repo, present - referenced, None, cutoff, report)
    report.referenced_packs += len(referenced & present)
    report.deleted_packs += sorted(doomed)
    report.legacy_deleted += len(doomed)
    if dry_run or not doomed:
        return
    repo.forget_packs(doomed)
    _delete(repo, doomed, None)


def _listed_packs(repo: Repository, prefix: str, workload: str) -> set[str]:
    """The pack ids with a pack or an index under `prefix` (keys that parse, of `workload`'s
    prefix: "" for the flat layout)."""
    return {
        n.id
        for k in repo.backend.list(prefix)
        if (n := keys.parse(k))
        and n.type in (FileType.PACK, FileType.INDEX)
        and n.workload == workload
    }


def _doomed(
    repo: Repository, unreferenced: set[str], home: str | None, cutoff: float, report: GcReport
) -> set[str]:
    doomed = set()
    for pid in sorted(unreferenced):
        if pack_created(pid) > cutoff or _stored_after(repo, pid, home, cutoff):
            report.kept_young += 1
            continue
        doomed.add(pid)
    return doomed


def _delete(repo: Repository, doomed: set[str], home: str | None) -> None:
    for pid in sorted(doomed):
        repo.backend.delete(index_key(pid, home))
        repo.backend.delete(keys.pack_key(pid, home))


def _unreadable(which: list[str]) -> str:
    return f"{len(which)} manifest(s) cannot be read, so the packs they reference are unknown: " + (
        which[0] + (f" (and {len(which) - 1} more)" if len(which) > 1 else "")
    )


def _stored_after(repo: Repository, pack_id: str, home: str | None, cutoff: float) -> bool:
    """A pack named long ago may have reached the store only now (its host's spool waited
    out an outage, and its manifest is next in line): its age is when it was stored."""
    for key in (keys.pack_key(pack_id, home), index_key(pack_id, home)):
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
        pending_packs: dict[str, set[str]] = {}  # pack id -> its keys waiting (pack, index)
        for k in pending:
            n = keys.parse(k)
            if n is not None and n.type in (FileType.PACK, FileType.INDEX):
                pending_packs.setdefault(n.id, set()).add(k)
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
            gone = (mine & set(pending_packs)) - still_needed
            repo.dedup.forget_for(m.workload, gone)
            keys_gone = {manifest_key(m.workload, m.id)}
            for pid in gone:
                keys_gone |= pending_packs[pid]
            discard({k for k in pending if k in keys_gone})
    return dropped
