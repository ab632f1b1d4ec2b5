"""Keeping the repository in bounds: retention per workload, garbage collection, and the
spool's limit while object storage is unreachable.

Garbage collection covers the workloads this host owns (docs/fleet.md, R3): their packs live
under their own prefixes and only their owner removes their checkpoints, so no host lists or
reads what belongs to other hosts' workloads (storage/gc.py). Which workloads are owned is
the engine's to say (`owned`): without a fleet, every workload registered here; in a fleet,
those not found owned elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from checkpointer.api import GcReport, RetentionRow
from checkpointer.config import Retention
from checkpointer.engine.events import Events
from storage import Repository, StorageError, gc, marks, retention
from storage.backends.spooled import SpooledBlobStore
from storage.errors import CorruptCheckpoint, TransientStorageError

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
        """
        try:
            infos = self.repo.checkpoints(name)
        except TransientStorageError as e:
            log.warning("retention of %s waits for object storage: %s", name, e)
            return []
        if not dry_run:
            try:
                for stray in self.repo.remove_strays(name):
                    log.warning("removed %s of %s: its head never named it (fenced)", stray, name)
            except StorageError as e:
                log.warning("retention: cannot remove fenced checkpoints of %s: %s", name, e)
        good = [i.id for i in infos if i.id not in bad]
        try:  # the newest checkpoint a restore drill proved is kept too (engine/drills.py)
            marked = marks.read(self.repo.backend, self.repo.codec, name)
        except StorageError as e:
            log.warning("retention of %s waits: its drill marks cannot be read: %s", name, e)
            return []
        verdicts = retention.decide(
            policy,
            [retention.Item(i.id, i.created, i.size_bytes) for i in infos],
            pinned=frozenset(self.repo.pins(name)),
            protected=frozenset(good[:1]),
            verified=frozenset(c for c, m in marked.items() if m.verified and c not in bad),
        )
        rows: list[RetentionRow] = []
        for v in verdicts:
            rows.append(
                {
                    "workload": name,
                    "id": v.id,
                    "created": v.created.isoformat(),
                    "action": "keep" if v.keep else "remove",
                    "reasons": v.reasons or ["no rule keeps it"],
                }
            )
            if v.keep or dry_run:
                continue
            try:
                self.repo.delete(name, v.id)
                if v.id in marked:
                    marks.remove(self.repo.backend, name, {v.id})
                self.events.retention_removed(name)
                log.info("retention: removed checkpoint %s of %s", v.id, name)
            except StorageError as e:
                log.warning("retention: cannot remove %s of %s: %s", v.id, name, e)
        return rows

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

    def scheduled_gc(self) -> None:
        try:
            self.collect_garbage()
        except StorageError as e:
            log.warning("gc failed: %s", e)
