"""The checkpoint pipeline: dump the running tree, commit the image, keep it for a fast restore.

The caller holds the workload's lock. Maintenance that follows a checkpoint (retention, the
spool's limit) is the engine's, not this module's.
"""

from __future__ import annotations

import logging
import shutil
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from checkpointer.api import CheckpointReport
from checkpointer.containers import ContainerRuntime
from checkpointer.criu import Criu, CriuError, DumpStats, cpuinfo_dump
from checkpointer.criu.cpu import fit as cpu_fit
from checkpointer.criu.cpu.info import CPUINFO_IMAGE, read_cpuinfo
from checkpointer.engine import kept_image, spec
from checkpointer.engine.checkpoint_spec import CheckpointSpec
from checkpointer.engine.disk_images import DiskImages
from checkpointer.engine.events import Events
from checkpointer.engine.scratch import Scratch
from checkpointer.engine.workload import Workload
from checkpointer.errors import CheckpointFailed, WorkloadNotRunning
from checkpointer.host import info as hostinfo
from checkpointer.workloads import process
from storage import Repository, StorageError
from storage.manifest import Manifest

log = logging.getLogger(__name__)
# How long a dump that lost a task waits for the tree's root to finish dying (see _died).
DEATH_GRACE = 2.0


class CheckpointPipeline:
    def __init__(
        self,
        repo: Repository,
        criu: Criu,
        scratch: Scratch,
        events: Events,
        keep_latest_image: bool,
        criu_version: Callable[[], str],
        log_fifo: Callable[[str], Path],
        runtimes: Mapping[str, ContainerRuntime],
        disk: DiskImages,
    ) -> None:
        self.disk = disk
        self.log_fifo = log_fifo
        self.runtimes = runtimes
        self.repo = repo
        self.criu = criu
        self.scratch = scratch
        self.events = events
        self.keep_latest_image = keep_latest_image
        self.criu_version = criu_version

    @staticmethod
    def _died(w: Workload, e: CriuError) -> bool:
        """Whether a failed dump failed because the tree died under it. A task killed while
        CRIU holds it is still exiting when CRIU gives up on it, so a "process gone" failure
        waits a moment for the root to be a zombie before it is counted as a failure."""
        deadline = time.monotonic() + (DEATH_GRACE if e.category == "process-gone" else 0)
        while w.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def run(
        self,
        w: Workload,
        generation: int | None = None,
        final: bool = False,
        for_reboot: bool = False,
    ) -> CheckpointReport:
        """Dump and store. `generation`: the fleet lease it is taken under (the fencing
        token: a restore under a newer lease refuses checkpoints of an older one taken after
        it began). `final`: the tree is left stopped. `for_reboot`: a planned shutdown's
        final checkpoint, copied into a disk slot for the boot after it; a migration's is
        not (this host drops its slots once it hands over: the copy only lengthened the
        tree's stop)."""
        if not w.alive():
            raise WorkloadNotRunning(
                f"workload {w.name} is not running ({w.exit_status or w.state}); "
                f"`checkpointer restore {w.name}` brings back its latest checkpoint"
            )
        assert w.pid is not None
        t0 = time.monotonic()
        images = self.scratch.new(w.name, "dump", w.pid)
        try:
            try:
                stats = self.dump(w, images, final)
            except CriuError as e:
                if self._died(w, e):
                    # The tree died while CRIU dumped it: a crash, which the supervisor
                    # restores, not a checkpoint that failed (no failure counted, no alert).
                    raise WorkloadNotRunning(
                        f"workload {w.name} exited while it was being checkpointed; the "
                        "daemon restores it from its latest checkpoint as after any crash"
                    ) from e
                w.last_error = str(e)
                self.events.checkpoint_failed(w.name, e.category)
                raise
            cpu = self.record_cpu(w, images)
            facts = hostinfo.host_facts()
            metadata = CheckpointSpec(
                host=facts["host"],
                boot_id=facts["boot_id"],
                kernel=facts["kernel"],
                criu_version=self.criu_version(),
                pid=w.pid,
                dump_stats=dict(stats.as_dict()),  # the manifest keeps it as read: a dict
                lease_generation=generation,
                cpu=cpu,  # what `checkpointer hosts` judges hosts by (engine/host_cpus.py)
                # The tree and its options: a host that takes the workload over runs it as
                # this one does (checkpointer/engine/spec.py).
                spec=spec.describe(w, str(self.log_fifo(w.name)) if w.managed else None),
            ).to_metadata()
            try:
                manifest = self.repo.commit(w.name, images, metadata, generation)
            except (StorageError, OSError) as e:
                w.last_error = f"storing the checkpoint failed: {e}"
                self.events.checkpoint_failed(w.name, "storage")
                raise CheckpointFailed(f"checkpoint of {w.name}: {w.last_error}") from e
            if self.keep_latest_image and not final:
                root = self.scratch.kept_root(images)
                w.kept = kept_image.keep(images, root, w.name, manifest.id, w.kept)
            elif final and for_reboot:  # no kept image (tmpfs goes with the reboot): the
                self.store_on_disk(w, images, manifest)  # boot reads this slot, lazily
        finally:
            shutil.rmtree(images.parent, ignore_errors=True)
        w.last_checkpoint, w.last_checkpoint_at, w.last_error = manifest.id, time.time(), None
        duration = time.monotonic() - t0
        if w.kept is not None and w.kept.id == manifest.id:
            self.store_on_disk(w, w.kept.path, manifest)
        self.events.checkpoint_ok(w.name, duration, stats, manifest.size_bytes, manifest.new_bytes)
        log.info(
            "checkpoint %s of %s: %d bytes, %d new (stored), frozen %.3fs, total %.2fs",
            manifest.id,
            w.name,
            manifest.size_bytes,
            manifest.new_bytes,
            stats.frozen_time,
            duration,
        )
        return {
            "workload": w.name,
            "id": manifest.id,
            "size_bytes": manifest.size_bytes,
            "new_bytes": manifest.new_bytes,
            "duration_seconds": round(duration, 3),
            "dump_stats": stats.as_dict(),
        }

    def record_cpu(self, w: Workload, images: Path) -> dict[str, Any] | None:
        """This CPU's features into the image folder (`cpuinfo.img`), so they travel with the
        checkpoint like every image file (same manifest, authenticated, one deduped chunk)
        and a host that may restore it checks them first (checkpointer/criu/cpu/info.py).
        Returns their summary for the metadata: `checkpointer hosts` judges every host
        against it without downloading the image (checkpointer/criu/cpu/fit.py). A failure
        costs that check, not the checkpoint."""
        try:
            cpuinfo_dump(self.criu, images)
            return cpu_fit.summary(read_cpuinfo(images / CPUINFO_IMAGE))
        except (CriuError, OSError, ValueError, IndexError, struct.error) as e:
            log.warning("checkpoint of %s records no CPU features: %s", w.name, e)
            return None

    def store_on_disk(self, w: Workload, source: Path, manifest: Manifest) -> None:
        """Copy the kept image into a disk slot (checkpointer/engine/disk_images.py). The
        checkpoint is durable already: a failure here costs a fast restore, nothing else."""
        if self.disk.slots <= 0:  # none kept (any more): the slots of before are deleted
            w.disk = self.disk.prune(w.name, w.disk)
            return
        t0 = time.monotonic()
        try:
            busy = None if w.lazy is None else w.lazy.reading_slot
            w.disk = self.disk.store(w.name, w.disk, source, manifest, busy)
        except OSError as e:
            log.warning("disk image of %s not written (%s): %s", w.name, manifest.id, e)
            w.disk = [d for d in w.disk if d.path.exists() and d.id != manifest.id]
            return
        log.info(
            "disk image of %s (%s) written in %.2fs", w.name, manifest.id, time.monotonic() - t0
        )

    def dump(self, w: Workload, images: Path, final: bool) -> DumpStats:
        """CRIU on the tree, or the container's runtime (which runs CRIU its own way)."""
        assert w.pid is not None
        if w.container:
            # A runtime stops a container for good after a final dump (LXC's -s, Podman without
            # --leave-running): a migration whose hand-over then fails could not thaw it. It
            # keeps running instead and is stopped here, as CRIU's --leave-stopped would.
            runtime = self.runtimes[str(w.kind)]
            stats = runtime.checkpoint(w.container, images, w.dump_options())
            if final:
                process.stop_tree(w.pid)
            return stats
        return self.criu.dump(w.pid, images, w.dump_options(), w.name, final)
