"""The restore pipeline: choose a checkpoint, get its image (kept in tmpfs, kept on disk, or
rebuilt from the repository, seeded from the kept newest image), and have CRIU restore it.

The caller holds the workload's lock, saves the registry and watches the new PID.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from checkpointer.api import RestoreReport
from checkpointer.containers import ContainerRuntime
from checkpointer.criu import Criu, CriuError, RestoreStats
from checkpointer.engine import kept_image, lazy_restoring, listing, spec
from checkpointer.engine.disk_image_files import DiskImageDamaged
from checkpointer.engine.disk_images import DiskImages
from checkpointer.engine.policy import is_transient as is_transient  # drills.py imports it
from checkpointer.engine.policy import storage_unavailable
from checkpointer.engine.scratch import Scratch
from checkpointer.engine.states import ImageSource
from checkpointer.engine.workload import Workload
from checkpointer.errors import RestoreFailed
from checkpointer.host import info as hostinfo
from checkpointer.workloads.logs import LogPump, open_for_workload
from storage import CheckpointNotFound, Repository, StorageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def nothing_to_restore(name: str) -> CheckpointNotFound:
    """The error of a restore or rollback of a workload with no checkpoint (yet)."""
    return CheckpointNotFound(
        f"workload {name} has no checkpoint to restore; "
        f"take one with `checkpointer checkpoint {name}`"
    )


@dataclass(frozen=True)
class Restored:
    report: RestoreReport
    stats: RestoreStats
    duration: float


@dataclass(frozen=True)
class LogPaths:
    """Where a managed workload's output goes: the FIFO its tree writes, the log we keep."""

    folder: Path

    def fifo(self, name: str) -> Path:
        return self.folder / f"{name}.fifo"

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"


class RestorePipeline:
    def __init__(
        self,
        repo: Repository,
        criu: Criu,
        scratch: Scratch,
        pump: LogPump,
        logs: LogPaths,
        runtimes: Mapping[str, ContainerRuntime],
        disk: DiskImages,
    ) -> None:
        self.disk = disk
        self.runtimes = runtimes
        self.repo = repo
        self.criu = criu
        self.scratch = scratch
        self.pump = pump
        self.logs = logs

    def newest(self, w: Workload) -> str:
        infos = listing.checkpoints(self.repo, w.name, w.last_checkpoint).checkpoints
        if not infos:
            raise nothing_to_restore(w.name)
        return infos[0].id

    def restore(
        self,
        w: Workload,
        checkpoint_id: str,
        reason: str,
        progress: Progress | None = None,
        lazy: bool | None = None,
    ) -> Restored:
        """Restore `checkpoint_id` as the workload's tree (which must not be running); from
        the repository lazily if `lazy` (None: as its restore.lazy says, unless the last lazy
        restore failed)."""
        t0 = time.monotonic()
        # Fleet: only what the head names exists, whatever image of it this host keeps (a
        # kept image may be of a checkpoint this host took after it lost the workload).
        self.repo.require_committed(w.name, checkpoint_id)
        lazy_disk = lazy is not False and w.restore.lazy_after_reboot and not w.lazy_off
        images, source = self.ready_image(
            w, checkpoint_id, lazy_asked=lazy is True, lazy_disk=lazy_disk and not w.container
        )
        if source is ImageSource.LAZY_DISK:
            image = next(d for d in w.disk if d.id == checkpoint_id)
            try:
                pid, stats = lazy_restoring.start(self, w, checkpoint_id, disk=image)
                return self._restored(w, checkpoint_id, reason, pid, stats, t0, source)
            except DiskImageDamaged as e:
                log.warning(
                    "disk image of %s (checkpoint %s) is unusable (%s): dropping it, "
                    "restoring from the repository",
                    w.name,
                    checkpoint_id,
                    e,
                )
                self.disk.drop(w.name, image)
                w.disk = [d for d in w.disk if d is not image]
                images, source = None, ImageSource.REPOSITORY
        if lazy is None:
            lazy = w.restore.lazy and not w.lazy_off
        if images is None and lazy and not w.container:
            pid, stats = lazy_restoring.start(self, w, checkpoint_id)
            return self._restored(w, checkpoint_id, reason, pid, stats, t0, ImageSource.LAZY)
        built = images is None
        images = images or self.scratch.new(w.name, "restore")
        try:
            if built:
                self.materialize(w, checkpoint_id, images, progress)
            pid, stats = self.restore_tree(w, checkpoint_id, images, reason)
        finally:
            if built:
                shutil.rmtree(images.parent, ignore_errors=True)
        w.lazy_off = False  # a full restore worked: the next one may be lazy again
        return self._restored(w, checkpoint_id, reason, pid, stats, t0, source)

    def replace(self, w: Workload, checkpoint_id: str, stop: Callable[[], None]) -> Restored:
        """Rollback: get `checkpoint_id`'s image first (a damaged checkpoint leaves the
        running tree alone), then `stop` the tree and restore it."""
        t0 = time.monotonic()
        images, source = self.ready_image(w, checkpoint_id)
        built = images is None
        images = images or self.scratch.new(w.name, "restore")
        try:
            if built:
                self.materialize(w, checkpoint_id, images)
            stop()
            pid, stats = self.restore_tree(w, checkpoint_id, images, "rollback")
        finally:
            if built:
                shutil.rmtree(images.parent, ignore_errors=True)
        return self._restored(w, checkpoint_id, "rollback", pid, stats, t0, source)

    def ready_image(
        self, w: Workload, checkpoint_id: str, lazy_asked: bool = False, lazy_disk: bool = False
    ) -> tuple[Path | None, ImageSource]:
        """A folder that already holds `checkpoint_id`'s image, checked, and what it is:
        the kept image, else a disk image (unless a lazy restore was asked for by name),
        else None: the image must come from the repository. With `lazy_disk`, a disk image
        written before a reboot is returned unchecked (LAZY_DISK): a lazy restore checks
        each page it reads instead of hashing the whole image from a cold disk first."""
        kept = self.kept(w, checkpoint_id)
        if kept is not None:
            return kept, ImageSource.KEPT
        if not lazy_asked:
            if lazy_disk and (cold := self.disk.after_reboot(w.name, w.disk, checkpoint_id)):
                return cold.path, ImageSource.LAZY_DISK
            image = self.disk.find(w.name, w.disk, checkpoint_id)
            if image is not None:
                if image.boot != hostinfo.boot_id():
                    fresh = self.disk.revalidated(image)
                    w.disk = [fresh if d is image else d for d in w.disk]
                return image.path, ImageSource.DISK
            w.disk = [d for d in w.disk if d.id != checkpoint_id]
        return None, ImageSource.REPOSITORY

    def _restored(
        self,
        w: Workload,
        checkpoint_id: str,
        reason: str,
        pid: int,
        stats: RestoreStats,
        t0: float,
        source: ImageSource,
    ) -> Restored:
        duration = time.monotonic() - t0
        log.info(
            "restored %s from %s (%s): pid %d in %.2fs",
            w.name,
            checkpoint_id,
            reason,
            pid,
            duration,
        )
        report: RestoreReport = {
            "workload": w.name,
            "checkpoint": checkpoint_id,
            "pid": pid,
            "reason": reason,
            "duration_seconds": round(duration, 3),
            "restore_stats": stats.as_dict(),
            "source": source,
        }
        return Restored(report, stats, duration)

    def kept(self, w: Workload, checkpoint_id: str | None) -> Path | None:
        """The kept image of `checkpoint_id`, if there is one and its files are untouched."""
        if w.kept is None or w.kept.id != checkpoint_id:
            return None
        if w.kept.intact():
            return w.kept.path
        log.warning(
            "kept image of %s does not match checkpoint %s: restoring from the repository",
            w.name,
            checkpoint_id,
        )
        kept_image.drop(w.kept)
        w.kept = None
        return None

    def materialize(
        self, w: Workload, checkpoint_id: str, images: Path, progress: Progress | None = None
    ) -> None:
        step = None
        if progress:
            total = self.repo.info(w.name, checkpoint_id).size_bytes
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                progress(done, total)

        seed = self._seed(w)
        try:
            try:
                self.repo.materialize(w.name, checkpoint_id, images, step, seed)
            except OSError as e:
                if seed is None:
                    raise
                log.warning("kept image of %s unusable (%s): fetching every chunk", w.name, e)
                done = 0
                self.repo.materialize(w.name, checkpoint_id, images, step)
        except CheckpointNotFound:
            raise
        except (StorageError, OSError) as e:
            w.last_error = str(e)
            raise RestoreFailed(
                f"cannot restore {w.name}: {e}", transient=storage_unavailable(e)
            ) from e

    def _seed(self, w: Workload) -> tuple[str, Path] | None:
        """The kept image of the newest checkpoint, when it still matches: an older checkpoint
        (rollback) shares most pages with it, which are then copied, not fetched."""
        checkpoint_id = w.kept.id if w.kept else None
        path = self.kept(w, checkpoint_id) if checkpoint_id else None
        if not (checkpoint_id and path):
            return None
        log.info(
            "pages %s shares with kept checkpoint %s are copied from it", w.name, checkpoint_id
        )
        return checkpoint_id, path

    def log_fds(self, w: Workload, checkpoint_id: str) -> list[tuple[int, str]]:
        """What CRIU is handed with `--inherit-fd` (the caller closes the fds)."""
        inherit: list[tuple[int, str]] = []
        if w.managed:
            fifo = self.logs.fifo(w.name)
            self.pump.attach(w.name, fifo, self.logs.log(w.name))
            # The image names the FIFO of the host that took it (its state_dir): CRIU gets
            # this host's FIFO for that path instead (CRIU names a file by its path without
            # the leading slash), so a checkpoint restores on any host.
            dumped = self._dumped_fifo(w, checkpoint_id) or str(fifo)
            inherit.append((open_for_workload(fifo), dumped.lstrip("/")))
        return inherit

    def restore_tree(
        self, w: Workload, checkpoint_id: str, images: Path, reason: str
    ) -> tuple[int, RestoreStats]:
        inherit = self.log_fds(w, checkpoint_id)
        try:
            if w.container:
                runtime = self.runtimes[str(w.kind)]
                pid, stats = runtime.restore(w.container, images, w.dump_options())
            else:
                pid, stats = self.criu.restore(images, w.dump_options(), w.name, inherit)
        except CriuError as e:
            w.last_error = str(e)
            raise
        finally:
            for fd, _ in inherit:
                os.close(fd)
        w.restored_as(pid)
        return pid, stats

    def _dumped_fifo(self, w: Workload, checkpoint_id: str) -> str | None:
        """The log FIFO path recorded with the checkpoint (absent before 2026-12)."""
        try:
            metadata = self.repo.info(w.name, checkpoint_id).metadata
            return spec.read(metadata, w.name, checkpoint_id).log_fifo
        except (StorageError, RestoreFailed):
            return None  # this host's own FIFO path: right unless the state_dirs differ
