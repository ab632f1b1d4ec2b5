"""Keeping the repository in bounds: retention per workload, garbage collection, and the
spool's limit while object storage is unreachable.

Garbage collection covers the workloads this host owns (docs/fleet.md, R3): their packs live
under their own prefixes and only their owner removes their checkpoints, so no host lists or
reads what belongs to other hosts' workloads (storage/gc.py). Which workloads are owned is
the engine's to say (`owned`): without a fleet, every workload registered here; in a fleet,
those not found owned elsewhere."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

from checkpointer.api import GcReport, RetentionRow
from checkpointer.config import Retention
from checkpointer.engine.events import Events
from checkpointer.engine.states import RetentionAction
from storage import Repository, StorageError, gc, marks, retention
from storage.backends.spooled import SpooledBlobStore
from storage.errors import CheckpointNotFound, CorruptCheckpoint, TransientStorageError
from storage.fencing import NotFenced
from storage.heads import Fenced
from storage.summaries import CheckpointInfo

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(
        self,
        repo: Repository,
        events: Events,
        spool: SpooledBlobStore | None,
        spool_max_bytes: int,
        owned: Callable[[], Iterable[str]],
    ) -> None:
        """`owned`: the workloads this host owns now (their GC is this host's)."""
        self.repo = repo
        self.events = events
        self.spool = spool
        self.spool_max_bytes = spool_max_bytes
        self.owned = owned

    def apply_retention(
        self,
        name: str,
        policy: Retention,
        bad: list[str],
        dry_run: bool = False,
    ) -> list[RetentionRow]:
        """Decide keep/remove for every checkpoint of `name`, and remove (unless dry_run).

        The newest good checkpoint is always kept: it is what a crash restores. Nothing is
        decided from a partial view: while the bucket cannot be listed, retention waits.

        In a fleet (docs/fleet.md, R4) the decision is registered with the repository as
        well: the next commit's head write applies it to the head it reads, in that same
        write, so a commit costs one head read and one head write and no listing; pins and
        marks come from the repository's view (storage/annotations.py), the head from the
        one this process last wrote. What is dropped is removed from the head only: the
        owner's hourly job deletes its manifest after the grace (`collect_garbage`).
        """
        fenced = self.repo.fencing is not None
        if fenced and not dry_run:
            self.repo.plan_with(name, functools.partial(self._plan, name, policy, bad))
        try:
            infos = self.repo.retention_view(name) if fenced else self.repo.checkpoints(name)
            pinned, marked = self._annotations(name)
            verdicts = _decide(policy, bad, infos, pinned, marked)
        except TransientStorageError as e:
            log.warning("retention of %s waits for object storage: %s", name, e)
            return []
        except StorageError as e:
            log.warning("retention of %s waits: its pins or marks cannot be read: %s", name, e)
            return []
        rows: list[RetentionRow] = [
            {
                "workload": name,
                "id": v.id,
                "created": v.created.isoformat(),
                "action": RetentionAction.KEEP if v.keep else RetentionAction.REMOVE,
                "reasons": v.reasons or ["no rule keeps it"],
            }
            for v in verdicts
        ]
        doomed = {v.id for v in verdicts if not v.keep}
        if dry_run or not doomed:
            return rows
        if fenced and self.repo.fencing is not None and self.repo.fencing.planned(name):
            return rows  # the queued head record of the commit drops them
        try:
            self.repo.retire(name, doomed)
        except StorageError as e:
            log.warning("retention: cannot remove %s of %s: %s", ", ".join(doomed), name, e)
            return rows
        for cid in sorted(doomed):
            self.events.retention_removed(name)
            log.info("retention: removed checkpoint %s of %s", cid, name)
        if not fenced and set(marked) & doomed:
            marks.remove(self.repo.backend, name, set(marked) & doomed)
        return rows

    def _annotations(self, name: str) -> tuple[set[str], dict[str, marks.Mark]]:
        """Pins and drill marks: fenced, the repository's view (storage/annotations.py);
        else listed now."""
        if self.repo.fencing is not None:
            return self.repo.annotations.pins(name), self.repo.annotations.marks(name)
        return self.repo.pins(name), marks.read(self.repo.backend, self.repo.codec, name)

    def _plan(
        self, name: str, policy: Retention, bad: list[str], chain: tuple[str, ...]
    ) -> set[str]:
        """The ids a head write of `name` drops, given the chain it read (oldest first)."""
        infos = [self.repo.info(name, c) for c in reversed(chain) if self._readable(name, c)]
        pinned, marked = self._annotations(name)
        doomed = {v.id for v in _decide(policy, bad, infos, pinned, marked) if not v.keep}
        for _ in doomed:
            self.events.retention_removed(name)
        return doomed

    def _readable(self, name: str, checkpoint_id: str) -> bool:
        """Unreadable ones are not decided on (`verify` reports them); an outage raises."""
        try:
            self.repo.info(name, checkpoint_id)
        except (CheckpointNotFound, CorruptCheckpoint):
            return False
        return True

    def shed_spool(self) -> None:
        """The backend is down and the spool is full: drop the oldest checkpoints not uploaded."""
        spool, limit = self.spool, self.spool_max_bytes
        if spool is None or spool.backlog_bytes() <= limit:
            return
        pending = spool.pending_keys()
        dropped = gc.shed(self.repo, pending, spool.discard, spool.backlog_bytes, limit)
        self.events.spool_shed(len(dropped))
        log.error(
            "spool over %d bytes while the backend is unreachable: dropped %d checkpoint(s) "
            "never uploaded: %s",
            limit,
            len(dropped),
            ", ".join(dropped) or "none",
        )

    def collect_garbage(self, dry_run: bool = False, also: Iterable[str] = ()) -> GcReport:
        """Collect the packs of the workloads this host owns (and of `also`: a workload
        `prune NAME` names) that nothing references. Raises CorruptCheckpoint, once the rest
        is collected, naming the workloads skipped because a manifest cannot be read."""
        owned = set(self.owned())
        if not dry_run:
            self._tidy(owned | set(also))
        report = gc.collect_garbage(self.repo, owned | set(also), dry_run=dry_run)
        self.repo.keep_only(owned)  # the indexes of workloads that moved away go
        if not dry_run:
            self.events.gc_collected(len(report.deleted_packs))
            if report.deleted_packs:
                log.info(
                    "gc: removed %d unreferenced pack(s) (%d of the legacy flat layout) of "
                    "%d workload(s)",
                    len(report.deleted_packs),
                    report.legacy_deleted,
                    len(report.workloads),
                )
        problem = report.problem()
        if problem is not None:
            raise CorruptCheckpoint(problem)
        return {
            "deleted_packs": len(report.deleted_packs),
            "kept_young_unreferenced": report.kept_young,
            "referenced_packs": report.referenced_packs,
        }

    def _tidy(self, names: set[str]) -> None:
        """Fleet mode, before GC: each owned workload's manifests the head no longer names
        are deleted once unnamed for the grace, after pins and marks are listed afresh
        (storage/fencing.py `tidy`): then GC frees their packs."""
        if self.repo.fencing is None:
            return
        for name in sorted(names):
            try:
                done = self.repo.tidy(name)
            except NotFenced:
                continue  # not ours (prune NAME of another host's workload)
            except Fenced as e:  # taken over while this host did not know: forget it here
                log.warning("not deleting the dropped checkpoints of %s: %s", name, e)
                self.repo.disown(name)
                continue
            except StorageError as e:
                log.warning("cannot delete the dropped checkpoints of %s: %s", name, e)
                continue
            for cid in done.rescued:
                log.warning("checkpoint %s of %s named again: pinned or verified since", cid, name)
            if done.deleted:
                log.info("removed %d checkpoint(s) of %s no head names", len(done.deleted), name)

    def scheduled_gc(self) -> None:
        try:
            self.collect_garbage()
        except StorageError as e:
            log.warning("gc failed: %s", e)


def _decide(
    policy: Retention,
    bad: list[str],
    infos: list[CheckpointInfo],
    pinned: set[str],
    marked: dict[str, marks.Mark],
) -> list[retention.Verdict]:
    """Retention's verdicts on `infos` (newest first)."""
    good = [i.id for i in infos if i.id not in bad]
    return retention.decide(
        policy,
        [retention.Item(i.id, i.created, i.size_bytes) for i in infos],
        pinned=frozenset(pinned),
        protected=frozenset(good[:1]),
        # the newest checkpoint a restore drill proved is kept too (engine/drills.py)
        verified=frozenset(c for c, m in marked.items() if m.verified and c not in bad),
    )
