"""Bringing trees back: restore on demand, rollback, and the automatic restore the supervisor
asks for when a tree dies. Each holds the workload's lock while it works.

A checkpoint is marked bad only for its own faults (damaged data, an image CRIU refuses);
a failure of the host or of storage (a PID or port taken, the bucket unreachable) leaves it
good and asks to be tried again later: marking every checkpoint bad during an outage would
cold-start the workload and lose the state they hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from checkpointer.api import RestoreReport
from checkpointer.engine import lazy_restoring, listing
from checkpointer.engine.carried import FromCheckpoint
from checkpointer.engine.cpu_check import CpuCheck
from checkpointer.engine.marks import marks, newest_unmarked, restored_from
from checkpointer.engine.parts import Hooks, Workloads
from checkpointer.engine.policy import Action, Fault, Streak, fault_of, on_death, plan, retry_later
from checkpointer.engine.restoring import Restored, RestorePipeline, nothing_to_restore
from checkpointer.engine.workload import RestoreReason, RestoreResult, Workload, WorkloadState
from checkpointer.errors import (
    CheckpointerError,
    NotOwner,
    RestoreFailed,
    WorkloadBusy,
    WorkloadRunning,
)
from storage import CheckpointNotFound, Repository
from storage.errors import StorageAccessError, TransientStorageError
from storage.manifest import check_workload_name

if TYPE_CHECKING:
    from checkpointer.engine.events import Events
    from checkpointer.engine.ownership import Ownership
    from storage.backends.spooled import SpooledBlobStore

log = logging.getLogger(__name__)


class Fresh(NamedTuple):
    """A decision at the daemon's start (a boot, a long gap): a new streak, not a crash loop.
    `why` the tree is gone; `seen`, the state the supervisor found the workload in, without its
    lock. A manual restore or a take-over may run while the decision waits for the lock: a tree
    alive again, or a state changed since (`running`, `restoring`), is left alone, or the
    running tree would be marked `restoring` (never checkpointed, nor restored when it dies)."""

    why: str
    seen: WorkloadState


class Recovery:
    """Restore on demand, rollback, and the automatic restore the supervisor asks for."""

    def __init__(
        self,
        workloads: Workloads,
        repo: Repository,
        restores: RestorePipeline,
        ownership: Ownership,
        events: Events,
        hooks: Hooks,
        spool: SpooledBlobStore | None,
        cpu: CpuCheck,
        carried: FromCheckpoint,
    ) -> None:
        self.workloads = workloads
        self.repo = repo
        self.restores = restores
        self.ownership = ownership
        self.events = events
        self.hooks = hooks
        self.spool = spool
        self.cpu = cpu
        self.carried = carried

    def restore(
        self,
        name: str,
        checkpoint_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        lazy: bool | None = None,
    ) -> RestoreReport:
        """Restore a workload that is not running (registered here, or known to the repository)."""
        w = self.workloads.find(name)
        if w is None:
            check_workload_name(name)
            infos = self.repo.checkpoints(name)
            # The lease before registering (fleet): a workload another host runs stays its own.
            if infos:
                self.ownership.claim(name)
            w = self.carried.register(name, checkpoint_id)
            self.cpu.before_restore(name, checkpoint_id, release=bool(infos))
        elif w.state is WorkloadState.ELSEWHERE:  # its newest checkpoints are another host's
            self.restores.newest(w)  # CheckpointNotFound: nothing to restore, nothing claimed
            self.ownership.claim(name)  # NotOwner: it runs elsewhere
            self.cpu.before_restore(name, checkpoint_id, release=True)
        with self.workloads.locked(w, wait=True):
            if w.alive():
                raise WorkloadRunning.named(name, w.pid)
            self.restores.newest(w)  # CheckpointNotFound: nothing to restore, nothing claimed
            self.ownership.claim(name)  # NotOwner: it runs elsewhere
            warning = None
            if checkpoint_id is None:
                cid = newest_unmarked(w, self._restorable(name))
            else:
                cid = checkpoint_id
                mark = marks(w).get(cid)
                if mark is not None:
                    warning = (
                        f"checkpoint {cid} of {name} is marked {mark[0]} ({mark[1]}); restored "
                        "because it was named"
                    )
                    log.warning("%s", warning)
            if w.state is WorkloadState.ELSEWHERE:  # it ran on another host since: its options
                self.carried.take(w, cid)
            try:
                done = self.restores.restore(w, cid, RestoreReason.MANUAL, progress, lazy)
            except Exception:
                self.events.restore_done(w.name, RestoreReason.MANUAL, ok=False)
                self.workloads.save()
                raise
            self._after_restore(w, RestoreReason.MANUAL, done.report["checkpoint"], done)
            w.streak = Streak()
            # Registered from the repository just now, or back from elsewhere.
            self.workloads.scheduled(w)
            self.workloads.save()
            if warning:
                done.report["warning"] = warning
            return done.report

    def rollback(self, name: str, to: str | None = None, back: int | None = None) -> RestoreReport:
        """Stop the running tree and restore an older checkpoint (`to` an id, or `back` N).
        One that fails after the stop hands the workload to the policy, once its lock is
        released (the supervisor decides under it, on a thread of its own); the user gets
        the RestoreFailed whatever the hand-over does."""
        w = self.workloads.get(name)
        failure = self._rollback(w, to, back)
        if isinstance(failure, RestoreFailed):
            try:
                self.hooks.down(w, RestoreReason.ROLLBACK)
            except Exception:
                log.exception("handing %s to the restore policy after its rollback failed", name)
            raise failure
        return failure

    def _rollback(
        self, w: Workload, to: str | None, back: int | None
    ) -> RestoreReport | RestoreFailed:
        name = w.name
        with self.workloads.locked(w, wait=True):
            self.ownership.hold(name)  # only the owner replaces the tree
            ids = self._restorable(name)
            if to is None:
                n = back or 0
                if n < 0 or n >= len(ids):
                    raise CheckpointNotFound(
                        f"workload {name} has {len(ids)} checkpoint(s): cannot go back {n}; "
                        f"see `checkpointer list {name}`"
                    )
                to = ids[n]
            elif to not in ids:
                self.repo.read_manifest(name, to)  # raises the clear not-found error
                raise RestoreFailed(
                    f"checkpoint {to} of {name} was taken by a host after it had lost the "
                    "workload's lease: it is never restored"
                )

            def stop() -> None:
                if w.alive():
                    self.workloads.teardown(w)

            try:
                done = self.restores.replace(w, to, stop)
            except Exception as e:
                self.events.restore_done(name, RestoreReason.ROLLBACK, ok=False)
                if w.alive():
                    if w.state is WorkloadState.STOPPING:  # the stop itself failed (TeardownFailed)
                        w.state = WorkloadState.RUNNING  # still there: watched, checkpointed
                        self.workloads.save()
                    raise  # failed before the stop: the tree runs on, nothing changed
                self._rollback_failed(w, to, e)
                failure = RestoreFailed(
                    f"rollback of {name} to {to} failed after its tree was stopped: {e}; "
                    "the daemon restores its newest good checkpoint instead "
                    f"(`checkpointer status {name}`)"
                )
                failure.__cause__ = e
                return failure
            self._after_restore(w, RestoreReason.ROLLBACK, to, done)
            self.workloads.save()
            return done.report

    def _rollback_failed(self, w: Workload, to: str, e: Exception) -> None:
        w.record(RestoreReason.ROLLBACK, RestoreResult.FAILED, str(e), to)
        if fault_of(e) is Fault.CHECKPOINT:
            w.mark_bad(to)
        w.state, w.exit_status = WorkloadState.CRASHED, f"rollback to {to} failed"
        w.streak = Streak()
        self.workloads.save()

    def _after_restore(self, w: Workload, reason: str, cid: str, done: Restored) -> None:
        self.events.restore_done(w.name, reason, True, done.duration, done.stats)
        w.record(
            reason,
            RestoreResult.OK,
            f"restored as pid {w.pid} from the {done.report['source']}",
            cid,
        )
        w.state = WorkloadState.RUNNING  # after its record: see Workload.restored_as
        self.hooks.watch(w)

    def on_down(
        self, name: str, reason: str, clean: bool = False, fresh: Fresh | None = None
    ) -> float | None:
        """Let the policy decide about a workload whose tree is down, and carry out the
        decision under its lock: the streak, then state `restoring` (returning the delay the
        supervisor waits before `auto_restore`), `failed`, or left as it is (None).
        `fresh`: the decisions at the daemon's start (Fresh)."""
        w = self.workloads.find(name)
        if w is None:
            return None
        with self.workloads.locked(w, wait=True):
            if fresh is not None:
                if w.alive() or w.state is not fresh.seen:
                    log.info("workload %s not restored at start: %s meanwhile", name, w.state)
                    return None
                w.state, w.exit_status, w.streak = WorkloadState.CRASHED, fresh.why, Streak()
            elif w.alive() or w.state not in (WorkloadState.CRASHED, WorkloadState.EXITED):
                return None  # restored by hand, stopped or unregistered meanwhile
            if lazy_restoring.settle(w):
                # Killed because its checkpoint is bad, now marked so (or the storage failed
                # it): not a crash loop that should step back past the one before as well.
                w.streak = Streak()
            d = on_death(w.restore, w.streak, time.time(), clean, restored_from(w))
            w.streak = d.streak
            if d.action is Action.IGNORE:
                log.info("workload %s: %s", w.name, d.why)
                self.workloads.save()
                return None
            if d.action is Action.GIVE_UP:
                self.workloads.fail(w, d.why)
                return None
            w.state = WorkloadState.RESTORING
            self.workloads.save()
            after = f" in {d.delay:.1f}s" if d.delay else ""
            log.warning("workload %s %s: %s%s", w.name, w.exit_status, d.why, after)
            return d.delay

    def retry_delay(self, name: str) -> float | None:
        """`auto_restore` said to try again (storage down, a PID or port taken): one more
        retry in the streak (`status` shows it, a restart continues it), and the back-off
        before it. None: the workload is gone."""
        w = self.workloads.find(name)
        if w is None:
            return None
        with self.workloads.locked(w, wait=True):
            w.streak, delay = retry_later(w.restore, w.streak)
            self.workloads.save()
        log.warning(
            "restore of %s will be tried again in %.1fs (retry %d)", name, delay, w.streak.retries
        )
        return delay

    def failed_unexpectedly(self, name: str, e: BaseException) -> None:
        """`auto_restore` (or the decision) raised what it should not have: the workload, still
        down, fails (the restore-failed alert). Under its lock, or without it when another
        operation holds that past the timeout, as before the lock: this is the supervisor's
        last word, and a workload left `restoring` with nothing scheduled is never brought
        back nor reported."""
        w = self.workloads.find(name)
        if w is None:
            return
        why = f"automatic restore failed unexpectedly: {e!r}"
        try:
            with self.workloads.locked(w, wait=True):
                if not w.alive():
                    self.workloads.fail(w, why)
        except WorkloadBusy:
            if not w.alive():
                self.workloads.fail(w, f"{why}; the workload was busy with another operation")

    def auto_restore(self, name: str, reason: str) -> bool:
        """Bring a dead workload back by its restore policy. Returns True when it should be
        tried again later: it failed for a reason outside the checkpoint (storage down, a PID
        or port in use), so nothing was marked bad.

        Tries the good checkpoints the policy's plan names, newest first, marking each that
        is at fault as bad; then a cold start of a managed workload; then gives up.
        """
        w = self.workloads.find(name)
        if w is None:
            return False
        with self.workloads.locked(w, wait=True):
            lazy_restoring.settle(w)  # a failed lazy restore: its checkpoint marked bad, or not
            if w.alive() or w.state not in (
                WorkloadState.CRASHED,
                WorkloadState.EXITED,
                WorkloadState.RESTORING,
            ):
                return False  # restored by hand, stopped or unregistered meanwhile
            try:
                # During an outage only this host's own newest checkpoint (listing.py).
                infos = listing.checkpoints(self.repo, name, w.last_checkpoint).checkpoints
                # The lease first (fleet): a host back from a reboot or a partition must not
                # start a tree that another host now runs.
                if self.ownership.claim(name) is not None:
                    # Fleet: the claim fenced the head; what the restore chooses from is read
                    # after it (a former owner's last commit may have landed just before).
                    infos = listing.checkpoints(self.repo, name, w.last_checkpoint).checkpoints
                good = [c.id for c in infos if c.id not in w.bad_checkpoints]
            except NotOwner as e:
                w.state, w.owner = WorkloadState.ELSEWHERE, self.ownership.owner(name)
                w.exit_status = f"runs on host {w.owner or '(another)'}"
                log.warning("workload %s not restored here: %s", name, e)
                self.workloads.unschedule(name)
                self.workloads.save()
                return False
            except Exception as e:
                if fault_of(e) is not Fault.OUTSIDE:
                    raise
                w.last_error = f"cannot list checkpoints: {e}"
                return self._retry_later(w, reason, w.last_error)
            if not good and self.spool is not None:
                # After a reboot with the network not up yet, only the local spool answers:
                # "no checkpoint" would cold-start the workload and lose its state. A listing
                # taken while the spool thought the bucket down came from the spool alone, even
                # if the bucket answers by now: list again from it before deciding anything.
                listed_offline = not self.spool.online
                reachable = self._remote_reachable()
                if not reachable or listed_offline:
                    if reachable:
                        self.spool.mark_online()
                    w.last_error = (
                        "the bucket answers again: listing its checkpoints"
                        if reachable
                        else "no checkpoint found locally and object storage is unreachable"
                    )
                    return self._retry_later(w, reason, w.last_error)
            steps = plan(w.restore, good, w.streak.depth, w.managed)
            for cid in steps.checkpoints:
                try:
                    done = self.restores.restore(w, cid, reason)
                except Exception as e:
                    if fault_of(e) is Fault.OUTSIDE:
                        return self._retry_later(w, reason, str(e), cid)
                    self.events.restore_done(w.name, reason, ok=False)
                    if not isinstance(e, CheckpointerError | CheckpointNotFound):
                        log.exception("restore of %s from %s failed unexpectedly", name, cid)
                    w.mark_bad(cid)
                    w.record(
                        reason, RestoreResult.FAILED, f"{e}; marked bad, trying the one before", cid
                    )
                    self.workloads.save()
                    continue
                self._after_restore(w, reason, cid, done)
                self._restored(w)
                return False
            if steps.cold_start:
                try:
                    self.workloads.start(w)
                except CheckpointerError as e:
                    w.record(reason, RestoreResult.FAILED, f"cold start failed: {e}")
                    self.events.restore_done(w.name, reason, ok=False)
                else:
                    self.events.restore_done(w.name, reason, ok=True)
                    w.record(
                        reason,
                        RestoreResult.OK,
                        f"no usable checkpoint left ({len(good)} good, "
                        f"depth {w.streak.depth}): cold-started from its command as pid {w.pid}",
                    )
                    self._restored(w)
                    return False
            self.workloads.fail(
                w,
                f"no checkpoint left to restore ({len(good)} good, stepped back "
                f"{w.streak.depth}, max_depth {w.restore.max_depth})"
                + ("" if w.managed else f"; {w.kind} workloads cannot cold-start"),
            )
            return False

    def _retry_later(
        self, w: Workload, reason: str, why: str, checkpoint: str | None = None
    ) -> bool:
        """A restore that failed outside the checkpoint: recorded and counted as a retry (not a
        failure: the restore-failed alert must not page through every storage outage); True,
        for auto_restore's caller to try again later."""
        w.record(reason, RestoreResult.RETRY, f"{why}; trying again later", checkpoint)
        self.events.restore_retried(w.name, reason)
        self.workloads.save()
        return True

    def _restorable(self, name: str) -> list[str]:
        """Checkpoint ids newest first: in fleet mode those the workload's head names, in its
        order (a stale owner's commits are in no head: docs/fleet.md, R4)."""
        w = self.workloads.find(name)
        listed = listing.checkpoints(self.repo, name, w.last_checkpoint if w else None)
        ids = [c.id for c in listed.checkpoints]
        if not ids:
            raise nothing_to_restore(name)
        return ids

    def _remote_reachable(self) -> bool:
        if self.spool is None:
            return True
        try:
            self.spool.remote.check()
        except (TransientStorageError, StorageAccessError):
            return False
        return True

    def _restored(self, w: Workload) -> None:
        """The policy's restore worked: the streak goes on (a death soon is a crash loop, and
        the checkpoints that crash-looped stay known), its retries are over."""
        w.streak = replace(w.streak, last_restore_at=time.time(), retries=0)
        self.workloads.save()
