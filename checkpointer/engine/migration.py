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
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from checkpointer.api import MigrateReport
from checkpointer.criu import CpuMismatch, cpuinfo_check
from checkpointer.criu.cpu.info import CPUINFO_IMAGE
from checkpointer.engine import kept_image
from checkpointer.engine.policy import Streak
from checkpointer.engine.workload import WorkloadState
from checkpointer.errors import CheckpointerError, MigrationFailed, NotOwner, WorkloadNotRunning
from checkpointer.host import info as hostinfo
from checkpointer.workloads import process
from storage import StorageError
from storage.file_reader import CheckpointFiles
from storage.leases import LeaseState

if TYPE_CHECKING:
    from checkpointer.engine.facade import Engine
    from checkpointer.engine.ownership import Fleet
    from checkpointer.engine.workload import Workload
    from storage.repository import CheckpointInfo

log = logging.getLogger(__name__)

UPLOAD_TIMEOUT = 300.0
# How long `migrate` lets the target fetch the newest checkpoint ahead while the tree still
# runs (a 1 GB image from a bucket takes seconds); past it the hand-over goes on anyway and
# the target fetches everything after it.
PREPARE_TIMEOUT = 120.0
# How long a failed hand-over waits for the bucket to say whether it landed, before it
# leaves the tree stopped and lets a thread find out.
HANDED_PATIENCE = 20.0
_CPUINFO_MAX = 64 * 1024  # CRIU writes ~150 bytes; a bigger one is not read whole


def migrate(engine: Engine, name: str, to: str) -> MigrateReport:
    fleet = engine.fleet
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
        raise MigrationFailed(
            f"host {to} is not a live host of this fleet (live: {', '.join(sorted(live)) or 'none'}"
            "); see `checkpointer hosts`"
        )
    w = engine.get(name)
    t0 = time.monotonic()
    with engine.locked(w, wait=True):
        if not w.alive():
            raise WorkloadNotRunning(f"workload {name} is not running here: nothing to migrate")
        generation = engine.ownership.hold(name)  # NotOwner: it is not ours to move
        assert w.pid is not None
        # Pre-copy: the target fetches the newest checkpoint while the tree still runs; the
        # freeze below then waits only for the pages changed since.
        fleet.prepare(name, to)
        try:  # MigrationFailed: the target cannot run it (its CPU): nothing stopped yet
            ahead = fleet.wait_prepared(name, to, PREPARE_TIMEOUT)
        except MigrationFailed:
            _call_off(fleet, name)
            engine.events.migration_done(name, ok=False)
            raise
        if ahead is None:
            log.warning("host %s did not fetch %s ahead: it fetches all of it after", to, name)
        frozen_at = time.time()
        frozen = _freeze_container(engine, w)
        try:
            report = engine.checkpoints.run(w, generation, final=True)
        except BaseException as e:
            _thaw(engine, w, frozen)  # a failed dump leaves the tree running already; be sure
            if isinstance(e, CheckpointerError):
                _call_off(fleet, name)
                engine.events.migration_done(name, ok=False)
            raise
        try:
            if engine.spool is not None and not engine.spool.wait_uploaded(UPLOAD_TIMEOUT):
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
                engine.events.migration_done(name, ok=False)
                _resolve_later(engine, fleet, w, to, frozen, generation)
                raise MigrationFailed(
                    f"the hand-over of {name} to {to} may or may not have landed ({e}): the "
                    "tree is kept stopped here until the lease can be read, then runs on here "
                    "or is ended here (it runs there)"
                ) from e
            if not handed:
                _thaw(engine, w, frozen)
                _call_off(fleet, name)
                engine.events.migration_done(name, ok=False)
                raise MigrationFailed(
                    f"migration of {name} to {to} failed before the hand-over ({e}); the tree "
                    "runs on here, nothing lost"
                ) from e
            log.warning("the hand-over of %s to %s landed, its reply was lost", name, to)
        engine.teardown(w)
        engine.repo.disown(name)  # the new owner retains and deletes from now on
        w.state, w.owner, w.exit_status = WorkloadState.ELSEWHERE, to, f"migrated to {to}"
        engine.drop_images(w)
        engine.schedule.unschedule(name)
        engine.save()
    duration = time.monotonic() - t0
    engine.events.migration_done(name, ok=True, duration=duration)
    log.info("workload %s migrated to %s: checkpoint %s", name, to, report["id"])
    return {
        "workload": name,
        "to": to,
        "checkpoint": report["id"],
        "duration_seconds": duration,
        "frozen_at": frozen_at,
    }


def _freeze_container(engine: Engine, w: Workload) -> bool:
    """A container is frozen from before its final dump until it is killed after the
    hand-over: its runtime dumps with the container left running (a stopped one could not be
    thawed if the hand-over fails), then archives its rootfs or exports it, and whatever the
    container wrote in between would be in the files but not in the memory the target
    restores. A frozen container is dumped as it is and stays frozen. True if frozen."""
    if not w.container:
        return False
    runtime = engine.runtimes[str(w.kind)]
    return runtime.freeze(w.container)


def _thaw(engine: Engine, w: Workload, frozen: bool) -> None:
    """The tree runs on here: the migration failed before the hand-over."""
    if frozen and w.container:
        engine.runtimes[str(w.kind)].thaw(w.container)
    if w.pid is not None:
        process.thaw(w.pid)


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


def _resolve_later(
    engine: Engine, fleet: Fleet, w: Workload, to: str, frozen: bool, generation: int | None
) -> None:
    """The hand-over's outcome is unknown: keep the tree stopped, and once the lease can be
    read, end it here (handed: it runs there) or let it run on (still ours)."""

    def resolve() -> None:
        handed = None
        while handed is None:
            handed = _handed(fleet, w.name, generation, patience=30.0)
        with engine.locked(w, wait=True):
            if handed:
                engine.teardown(w)
                w.state, w.owner, w.exit_status = WorkloadState.ELSEWHERE, to, f"migrated to {to}"
                engine.drop_images(w)
                engine.schedule.unschedule(w.name)
                engine.save()
                log.warning("the hand-over of %s to %s had landed: ended here", w.name, to)
            else:
                _thaw(engine, w, frozen)
                _call_off(fleet, w.name)
                log.warning("the hand-over of %s to %s had not landed: runs on here", w.name, to)

    threading.Thread(target=resolve, name=f"hand-over-{w.name}", daemon=True).start()


def _call_off(fleet: Fleet, name: str) -> None:
    try:
        fleet.prepare(name, None)
    except (CheckpointerError, StorageError) as e:
        log.warning("could not call off the hand-over of %s: %s", name, e)


def prefetch(engine: Engine, name: str) -> str | None:
    """Fetch the newest checkpoint of a workload about to be handed to this host, as its kept
    image: the restore after the hand-over copies the pages it shares with it and fetches
    only the rest. Returns the checkpoint fetched; CpuMismatch if this host's CPU cannot
    run it."""
    from checkpointer.engine import recovery

    infos = engine.repo.checkpoints(name)
    if not infos:
        return None
    w = engine.registry.find(name)
    if w is None:
        w = recovery.workload_from_repository(engine, name, None)
        w.state, w.owner = WorkloadState.ELSEWHERE, engine.ownership.owner(name)
    if w.alive():
        return None
    info = infos[0]
    newest = info.id
    with engine.locked(w, wait=True):
        if w.kept is not None and w.kept.id == newest and w.kept.intact():
            return newest
        t0 = time.monotonic()
        images = engine.scratch.new(name, "prefetch")
        try:
            engine.restores.materialize(w, newest, images)
            check_cpu(engine, name, info, images)
            w.kept = kept_image.keep(images, engine.scratch.kept_root(images), name, newest, w.kept)
        finally:
            shutil.rmtree(images.parent, ignore_errors=True)
        engine.save()
    log.info(
        "fetched %s of %s ahead of its hand-over in %.2fs", newest, name, time.monotonic() - t0
    )
    return newest


def check_cpu(engine: Engine, name: str, info: CheckpointInfo, images: Path) -> None:
    """Refuse (CpuMismatch, one line: the features, both hosts) a checkpoint this host's CPU
    cannot run, before anyone stops or gives up the tree: the target of a migration checks
    the checkpoint it fetched ahead (the final one is taken on the same CPU), a host taking
    over checks before it claims the lease, so a compatible one takes it instead."""
    check = cpuinfo_check(engine.criu, images)
    if check is None or check.compatible:
        return
    here = engine.fleet.host if engine.fleet else hostinfo.host_facts()["host"]
    there = engine.ownership.owner(name) or info.metadata.get("host") or "(unknown)"
    raise CpuMismatch(
        f"{name} cannot run on host {here}: its CPU {check.summary()}, which host {there} "
        f"has (checkpoint {info.id}; criu cpuinfo check: {check.criu_says})"
    )


@runtime_checkable
class CpuRefusals(Protocol):
    """Events that count checkpoints this host's CPU cannot run (the daemon's metrics)."""

    def cpu_refused(self, workload: str) -> None: ...


# Workload -> the newest checkpoint this host's CPU was found unable to run: the fleet offers
# an expired lease at every scan, and fetching the same checkpoint again says nothing new.
_REFUSED: dict[str, str] = {}


def _cpu_fits(engine: Engine, name: str) -> bool:
    """Before a failover claims the lease: check the newest checkpoint's CPU here. A
    mismatch is logged in one line and counted (alert CheckpointerWorkloadCpuIncompatible
    when no host of the fleet can take it)."""
    try:
        infos = engine.repo.checkpoints(name)
        if infos and _REFUSED.get(name) == infos[0].id:
            return False
        check_cpu_of(engine, name)
    except CpuMismatch as e:
        _REFUSED[name] = infos[0].id
        log.error("failover: %s; leaving it to another host", e)
        if isinstance(engine.events, CpuRefusals):
            engine.events.cpu_refused(name)
        return False
    except (CheckpointerError, StorageError, OSError) as e:  # the restore says it better
        log.warning("failover: cannot fetch %s ahead to check its CPU: %s", name, e)
    _REFUSED.pop(name, None)
    return True


def check_cpu_of(engine: Engine, name: str, checkpoint_id: str | None = None) -> None:
    """`check_cpu` of the newest checkpoint (or `checkpoint_id`), reading only its
    `cpuinfo.img` (authenticated like every file, with the packs' indexes): a failover or a
    restore by hand fetches the rest once it knows this host can run it."""
    infos = engine.repo.checkpoints(name)
    info = next((c for c in infos if c.id == checkpoint_id), infos[0] if infos else None)
    if info is None:
        return
    files = CheckpointFiles(engine.repo, name, info.id, engine.repo.known_chunks(name))
    if CPUINFO_IMAGE not in files.files or files.size(CPUINFO_IMAGE) > _CPUINFO_MAX:
        return  # taken by an older version: nothing to check against
    with tempfile.TemporaryDirectory(prefix="cpuinfo-") as tmp:
        recorded = files.read(CPUINFO_IMAGE, 0, files.size(CPUINFO_IMAGE))
        (Path(tmp) / CPUINFO_IMAGE).write_bytes(recorded)
        check_cpu(engine, name, info, Path(tmp))


def fence(engine: Engine, name: str, holder: str | None) -> None:
    """This host lost the lease of `name`: stop the copy that runs here, for good, and
    forget what the repository knew of it as its owner (grace times, retention, pins)."""
    engine.repo.disown(name)
    w = engine.registry.find(name)
    if w is None:
        return
    with engine.locked(w, wait=True):
        if w.alive():
            log.error("workload %s: stopping it here, host %s owns it now", name, holder)
            engine.teardown(w)
        w.state, w.owner = WorkloadState.ELSEWHERE, holder
        w.exit_status = f"owned by host {holder or '(another)'}"
        engine.schedule.unschedule(name)
        engine.drop_images(w)
        engine.save()


def take_over(engine: Engine, name: str, reason: str) -> None:
    """Bring back here a workload handed to this host (`migration`) or left by a host whose
    lease expired (`failover`), with the options its newest checkpoint carries (schedule,
    retention, restore policy, env: checkpointer/engine/spec.py). Registered from that
    checkpoint if unknown here; the restore then claims the lease, so of two hosts racing,
    one restores and one stands by."""
    from checkpointer.engine import recovery

    if reason == "failover" and not _cpu_fits(engine, name):
        return  # stand by: a host whose CPU can run it takes it over
    w = engine.registry.find(name)
    known = w is not None
    if w is None:
        try:
            w = recovery.workload_from_repository(engine, name, None)
        except (CheckpointerError, StorageError) as e:
            log.error("cannot take over %s: %s", name, e)
            return
    with engine.locked(w, wait=True):
        if w.alive() or w.state is WorkloadState.RESTORING:
            return
        if known:  # registered before (it ran here, or was fetched ahead): the owner's options
            recovery.take_carried_options(engine, w)
        w.state, w.exit_status, w.streak = WorkloadState.CRASHED, f"{reason} to this host", Streak()
        engine.save()
    engine.scheduled(w)
    engine.hooks.restore_soon(w, reason)


__all__ = ["NotOwner", "fence", "migrate", "take_over"]
