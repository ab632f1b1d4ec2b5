"""Moving a workload between hosts of a fleet: `migrate` hands it over, the fleet loop has a
host take over what was handed to it or what a dead host left, and a host that lost a lease
stops its copy.

Migration order, so that nothing is lost and only one copy ever runs: the final checkpoint
with the tree left stopped (nothing changes after it), uploaded, then the lease handed to the
target, and only then the tree killed. A failure before the hand-over thaws the tree: it runs
on here as if nothing happened.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from checkpointer.api import MigrateReport
from checkpointer.engine import kept_image
from checkpointer.engine.carried import FromCheckpoint
from checkpointer.engine.checkpointing import CheckpointPipeline
from checkpointer.engine.cpu_check import CpuCheck
from checkpointer.engine.parts import Hooks, Workloads
from checkpointer.engine.policy import Streak
from checkpointer.engine.restoring import RestorePipeline
from checkpointer.engine.scratch import Scratch
from checkpointer.engine.workload import RestoreReason, WorkloadState
from checkpointer.errors import (
    CheckpointerError,
    MigrationFailed,
    WorkloadNotFound,
    WorkloadNotRunning,
)
from checkpointer.workloads import process
from storage import Repository, StorageError
from storage.leases import LeaseState

if TYPE_CHECKING:
    from checkpointer.containers import ContainerRuntime
    from checkpointer.engine.events import Events
    from checkpointer.engine.ownership import Fleet, Ownership
    from checkpointer.engine.workload import Workload
    from storage.backends.spooled import SpooledBlobStore

log = logging.getLogger(__name__)

UPLOAD_TIMEOUT = 300.0
# How long `migrate` lets the target fetch the newest checkpoint ahead while the tree still
# runs (a 1 GB image from a bucket takes seconds); past it the hand-over goes on anyway and
# the target fetches everything after it.
PREPARE_TIMEOUT = 120.0
# How long a failed hand-over waits for the bucket to say whether it landed, before it
# leaves the tree stopped and lets a thread find out.
HANDED_PATIENCE = 20.0


class Migration:
    """`migrate` hands a workload over; `take_over` brings back one handed to this host or left
    by a dead host; `fence` stops the copy of one whose lease this host lost; `prefetch`
    fetches the newest checkpoint of one about to be handed here."""

    def __init__(
        self,
        workloads: Workloads,
        repo: Repository,
        checkpoints: CheckpointPipeline,
        restores: RestorePipeline,
        scratch: Scratch,
        ownership: Ownership,
        events: Events,
        hooks: Hooks,
        spool: SpooledBlobStore | None,
        fleet: Fleet | None,
        runtimes: Mapping[str, ContainerRuntime],
        cpu: CpuCheck,
        carried: FromCheckpoint,
    ) -> None:
        self.workloads = workloads
        self.repo = repo
        self.checkpoints = checkpoints
        self.restores = restores
        self.scratch = scratch
        self.ownership = ownership
        self.events = events
        self.hooks = hooks
        self.spool = spool
        self.fleet = fleet
        self.runtimes = runtimes
        self.cpu = cpu
        self.carried = carried

    def migrate(self, name: str, to: str) -> MigrateReport:
        fleet = self.fleet
        if fleet is None:
            raise MigrationFailed(
                "migrate needs fleet mode: set fleet.enabled (with S3 storage) on every host"
            )
        if to == fleet.host:
            raise MigrationFailed(f"{name} already runs on {to}: give another host")
        try:
            live = fleet.live_hosts()
        except StorageError as e:
            raise MigrationFailed(f"cannot reach the bucket to find host {to}: {e}") from e
        if to not in live:
            hosts = ", ".join(sorted(live)) or "none"
            raise MigrationFailed(
                f"host {to} is not a live host of this fleet (live: {hosts}); "
                "see `checkpointer hosts`"
            )
        w = self.workloads.get(name)
        t0 = time.monotonic()
        with self.workloads.locked(w, wait=True):
            if not w.alive():
                raise WorkloadNotRunning(f"workload {name} is not running here: nothing to migrate")
            generation = self.ownership.hold(name)  # NotOwner: it is not ours to move
            assert w.pid is not None
            # Pre-copy: the target fetches the newest checkpoint while the tree still runs; the
            # freeze below then waits only for the pages changed since.
            fleet.prepare(name, to)
            try:  # MigrationFailed: the target cannot run it (its CPU): nothing stopped yet
                ahead = fleet.wait_prepared(name, to, PREPARE_TIMEOUT)
            except MigrationFailed:
                _call_off(fleet, name)
                self.events.migration_done(name, ok=False)
                raise
            if ahead is None:
                log.warning("host %s did not fetch %s ahead: it fetches all of it after", to, name)
            frozen_at = time.time()
            frozen = self._freeze_container(w)
            try:
                report = self.checkpoints.run(w, generation, final=True)
            except BaseException as e:
                self._thaw(w, frozen)  # a failed dump leaves the tree running already; be sure
                if isinstance(e, CheckpointerError):
                    _call_off(fleet, name)
                    self.events.migration_done(name, ok=False)
                raise
            try:
                if self.spool is not None and not self.spool.wait_uploaded(UPLOAD_TIMEOUT):
                    raise MigrationFailed(
                        f"the final checkpoint of {name} did not reach the bucket within "
                        f"{UPLOAD_TIMEOUT:.0f}s"
                    )
                fleet.hand_over(name, to)
            except (CheckpointerError, StorageError) as e:
                # A hand-over that failed in the store may still have landed (its reply lost):
                # the tree stays stopped until the lease says which (never two copies).
                handed = _handed(fleet, name, generation)
                if handed is None:
                    self.events.migration_done(name, ok=False)
                    self._resolve_later(fleet, w, to, frozen, generation)
                    raise MigrationFailed(
                        f"the hand-over of {name} to {to} may or may not have landed ({e}): the "
                        "tree is kept stopped here until the lease can be read, then runs on here "
                        "or is ended here (it runs there)"
                    ) from e
                if not handed:
                    self._thaw(w, frozen)
                    _call_off(fleet, name)
                    self.events.migration_done(name, ok=False)
                    raise MigrationFailed(
                        f"migration of {name} to {to} failed before the hand-over ({e}); the tree "
                        "runs on here, nothing lost"
                    ) from e
                log.warning("the hand-over of %s to %s landed, its reply was lost", name, to)
            self.workloads.teardown(w)
            self.repo.disown(name)  # the new owner retains and deletes from now on
            w.state, w.owner, w.exit_status = WorkloadState.ELSEWHERE, to, f"migrated to {to}"
            self.workloads.drop_images(w)
            self.workloads.unschedule(name)
            self.workloads.save()
        duration = time.monotonic() - t0
        self.events.migration_done(name, ok=True, duration=duration)
        log.info("workload %s migrated to %s: checkpoint %s", name, to, report["id"])
        return {
            "workload": name,
            "to": to,
            "checkpoint": report["id"],
            "duration_seconds": duration,
            "frozen_at": frozen_at,
        }

    def _freeze_container(self, w: Workload) -> bool:
        """A container is frozen from before its final dump until it is killed after the
        hand-over: its runtime dumps with the container left running (a stopped one could not be
        thawed if the hand-over fails), then archives its rootfs or exports it, and whatever the
        container wrote in between would be in the files but not in the memory the target
        restores. A frozen container is dumped as it is and stays frozen. True if frozen."""
        if not w.container:
            return False
        runtime = self.runtimes[str(w.kind)]
        return runtime.freeze(w.container)

    def _thaw(self, w: Workload, frozen: bool) -> None:
        """The tree runs on here: the migration failed before the hand-over."""
        if frozen and w.container:
            self.runtimes[str(w.kind)].thaw(w.container)
        if w.pid is not None:
            process.thaw(w.pid)

    def _resolve_later(
        self, fleet: Fleet, w: Workload, to: str, frozen: bool, generation: int | None
    ) -> None:
        """The hand-over's outcome is unknown: keep the tree stopped, and once the lease can be
        read, end it here (handed: it runs there) or let it run on (still ours)."""

        def resolve() -> None:
            handed = None
            while handed is None:
                handed = _handed(fleet, w.name, generation, patience=30.0)
            with self.workloads.locked(w, wait=True):
                if handed:
                    self.workloads.teardown(w)
                    w.state, w.owner = WorkloadState.ELSEWHERE, to
                    w.exit_status = f"migrated to {to}"
                    self.workloads.drop_images(w)
                    self.workloads.unschedule(w.name)
                    self.workloads.save()
                    log.warning("the hand-over of %s to %s had landed: ended here", w.name, to)
                else:
                    self._thaw(w, frozen)
                    _call_off(fleet, w.name)
                    log.warning(
                        "the hand-over of %s to %s had not landed: runs on here", w.name, to
                    )

        threading.Thread(target=resolve, name=f"hand-over-{w.name}", daemon=True).start()

    def prefetch(self, name: str) -> str | None:
        """Fetch the newest checkpoint of a workload about to be handed to this host, as its kept
        image: the restore after the hand-over copies the pages it shares with it and fetches
        only the rest. Returns the checkpoint fetched; CpuMismatch if this host's CPU cannot
        run it."""
        infos = self.repo.checkpoints(name)
        if not infos:
            return None
        w = self.workloads.find(name)
        if w is None:
            w = self.carried.register(name, None)
            w.state, w.owner = WorkloadState.ELSEWHERE, self.ownership.owner(name)
        if w.alive():
            return None
        info = infos[0]
        newest = info.id
        with self.workloads.locked(w, wait=True):
            if w.kept is not None and w.kept.id == newest and w.kept.intact():
                return newest
            t0 = time.monotonic()
            images = self.scratch.new(name, "prefetch")
            try:
                self.restores.materialize(w, newest, images)
                self.cpu.check(name, info, images)
                w.kept = kept_image.keep(
                    images, self.scratch.kept_root(images), name, newest, w.kept
                )
            finally:
                shutil.rmtree(images.parent, ignore_errors=True)
            self.workloads.save()
        log.info(
            "fetched %s of %s ahead of its hand-over in %.2fs", newest, name, time.monotonic() - t0
        )
        return newest

    def fence(self, name: str, holder: str | None) -> None:
        """This host lost the lease of `name`: stop the copy that runs here, for good, and
        forget what the repository knew of it as its owner (grace times, retention, pins)."""
        self.repo.disown(name)
        w = self.workloads.find(name)
        if w is None:
            return
        with self.workloads.locked(w, wait=True):
            if w.alive():
                log.error("workload %s: stopping it here, host %s owns it now", name, holder)
                self.workloads.teardown(w)
            w.state, w.owner = WorkloadState.ELSEWHERE, holder
            w.exit_status = f"owned by host {holder or '(another)'}"
            self.workloads.unschedule(name)
            self.workloads.drop_images(w)
            self.workloads.save()

    def take_over(self, name: str, reason: str) -> None:
        """Bring back here a workload handed to this host (`migration`) or left by a host whose
        lease expired (`failover`), with the options its newest checkpoint carries (schedule,
        retention, restore policy, env: checkpointer/engine/spec.py). Registered from that
        checkpoint if unknown here; the restore then claims the lease, so of two hosts racing,
        one restores and one stands by. Its state turns `restoring` here, under its lock;
        the supervisor restores it at once (`hooks.restore_soon`)."""
        if reason == RestoreReason.FAILOVER and not self.cpu.fits(name):
            return  # stand by: a host whose CPU can run it takes it over
        w = self.workloads.find(name)
        known = w is not None
        if w is None:
            try:
                w = self.carried.register(name, None)
            except WorkloadNotFound:
                # The head is the commit point (docs/fleet.md R4): an owner stopped between
                # its first manifest's upload and its head write committed nothing. Not given
                # up: the lease is offered again while it stays the dead host's (fleet_scan).
                log.error(
                    "cannot take over %s: the bucket holds no committed checkpoint of it (its "
                    "head names none: its owner stopped before its first checkpoint was "
                    "committed); looked at again later",
                    name,
                )
                return
            except (CheckpointerError, StorageError) as e:
                log.error("cannot take over %s: %s", name, e)
                return
        with self.workloads.locked(w, wait=True):
            if w.alive() or w.state is WorkloadState.RESTORING:
                return
            if known:  # registered before (it ran here, or was fetched ahead)
                self.carried.take(w)  # the owner's options
            w.state, w.exit_status = WorkloadState.RESTORING, f"{reason} to this host"
            w.streak = Streak()
            self.workloads.save()
        self.workloads.scheduled(w)
        self.hooks.restore_soon(w, reason)


def _handed(
    fleet: Fleet, name: str, generation: int | None, patience: float = HANDED_PATIENCE
) -> bool | None:
    """Whether the lease of `name` has left this host (handed over, as the write may have
    landed with its reply lost, or taken by another host meanwhile): the tree must then end
    here. False only if it is still this host's, in the generation the migration held;
    None if the bucket cannot say within `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            lease = fleet.lease(name)
        except StorageError:
            if time.monotonic() > deadline:
                return None
            time.sleep(1.0)
            continue
        still_ours = (
            lease is not None
            and lease.holder == fleet.host
            and lease.state in (LeaseState.HELD, LeaseState.PREPARING)
            and (generation is None or lease.generation == generation)
        )
        return not still_ours


def _call_off(fleet: Fleet, name: str) -> None:
    try:
        fleet.prepare(name, None)
    except (CheckpointerError, StorageError) as e:
        log.warning("could not call off the hand-over of %s: %s", name, e)
