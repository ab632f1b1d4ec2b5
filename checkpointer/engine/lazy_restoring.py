"""A lazy restore from the repository (`restore.lazy`), or from a disk image after a reboot
(`restore.lazy_after_reboot`): the tree runs before its memory is back.

Every image but the pages is rebuilt (a few MB), then CRIU restores the tree with its private
anonymous memory missing; our page server fetches each page from the repository (or reads it
from the disk image, checked against the manifest: checkpointer/engine/disk_image_files.py)
when the tree touches it or the background transfer asks for it, verified as a full restore
verifies it. The restore returns as soon as the tree runs. A disk image found damaged is
dropped and the same checkpoint restored again from the repository: the checkpoint is good.

A page that cannot be fetched or verified kills the tree (checkpointer.criu.lazy holds its
userfaultfds, so it never runs on zero pages); its death then reaches the restore policy like
any crash. Why the page did not come decides what follows, by the full restore's rule
(policy.is_transient): damaged data marks the checkpoint bad and the one before is
restored in full; storage unreachable or stalled (the bucket down, a read still retrying
when the stall watchdog fired) leaves it good, and the same checkpoint is restored again, with
the policy's back-off while the storage stays down. Marking checkpoints bad through an outage
would cold-start the workload and lose the state they hold. A restore that failed for this
host's own sake (the lazy restore's guard died: `LazyRestore.host_fault`) leaves it good too.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from checkpointer.criu import CriuError, RestoreStats
from checkpointer.criu.lazy import LazyRestore, prepare_restore_dir
from checkpointer.engine.disk_image_files import DiskImageDamaged, DiskImageFiles
from checkpointer.engine.policy import storage_unavailable
from checkpointer.engine.workload import LazyInFlight, RestoreReason, RestoreResult, Workload
from checkpointer.errors import RestoreFailed
from storage import StorageError
from storage.file_reader import CheckpointFiles
from storage.manifest import FileEntry

if TYPE_CHECKING:
    from collections.abc import Mapping

    from checkpointer.criu import Criu
    from checkpointer.engine.disk_images import DiskImage
    from checkpointer.engine.scratch import Scratch
    from storage import Repository

log = logging.getLogger(__name__)

_PAGES = re.compile(r"pages-(\d+)\.img")
_EARLY = re.compile(r"(inventory|pstree|core-\d+|ids-\d+)\.img")


class ImageFiles(Protocol):
    """Where a lazy restore reads a checkpoint's files: the repository (CheckpointFiles) or a
    disk image (DiskImageFiles); either checks what it returns."""

    @property
    def files(self) -> Mapping[str, FileEntry]: ...

    def read(self, name: str, offset: int, length: int) -> bytes: ...

    def locate_ahead(self, names: list[str]) -> None: ...


class RepositoryPages:
    """CRIU's pages-N.img of one checkpoint, page ranges fetched from the repository.

    It also remembers how its reads went, for `settle` to tell a checkpoint's fault from the
    storage's: the first error a read raised, and how long reads took (the one in flight
    included). The page server turns either into one line of text for the LazyRestore."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._reading_since: float | None = None
        self._slowest = 0.0

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        started = time.monotonic()
        with self._lock:
            self._reading_since = started
        try:
            data = self.files.read(f"pages-{pages_id}.img", offset, nr_pages * 4096)
            if len(data) != nr_pages * 4096:
                raise StorageError(
                    f"pages-{pages_id}.img ends before page {offset // 4096 + nr_pages}"
                )
            return data
        except BaseException as e:
            with self._lock:
                self.error = self.error or e
            raise
        finally:
            with self._lock:
                self._reading_since = None
                self._slowest = max(self._slowest, time.monotonic() - started)

    def slowest_read(self) -> float:
        """Seconds of the slowest read so far, the one in flight counted up to now."""
        with self._lock:
            if self._reading_since is None:
                return self._slowest
            return max(self._slowest, time.monotonic() - self._reading_since)


class LazyParts(Protocol):
    """What a lazy restore uses of the restore pipeline (engine/restoring.py), which hands
    itself over: where to build the images, what to read, what runs CRIU, the log fds."""

    scratch: Scratch
    repo: Repository
    criu: Criu

    def log_fds(self, w: Workload, checkpoint_id: str) -> list[tuple[int, str]]: ...


@dataclass
class LazyTransfer(LazyInFlight):
    """A lazy restore in flight, with its page source: what `settle` asks why it failed."""

    pages: RepositoryPages | None = None


def start(
    p: LazyParts, w: Workload, checkpoint_id: str, disk: DiskImage | None = None
) -> tuple[int, RestoreStats]:
    """Start the lazy restore of `checkpoint_id`, its pages from the repository or, if
    `disk`, from that disk image; the restored root's PID once it runs. DiskImageDamaged if
    the disk image fails before the tree runs (the caller restores from the repository)."""
    t0 = time.monotonic()
    images = p.scratch.new(w.name, "lazy")
    lazy: LazyRestore | None = None
    files: ImageFiles | None = None
    ran = False  # LazyRestore.run undoes its own failures; before it, they are undone here
    serving = False  # run returned: the page server reads `files` until `_finished` closes them
    try:
        try:
            if disk is not None:
                files = DiskImageFiles(p.repo, w.name, checkpoint_id, disk.path)
            else:
                files = CheckpointFiles(p.repo, w.name, checkpoint_id, p.repo.known_chunks(w.name))
            t_index = time.monotonic()
            # What CRIU's lazy-pages daemon reads as it starts (the inventory and the process
            # tree: lazy_pages_prepare_pstree, criu/uffd.c) first: it starts (~50 ms) while
            # the rest is written and prepared. It reads the pagemaps only once the restore
            # hands it the tree's userfaultfds, after all of them are ready.
            others = [n for n in files.files if not _PAGES.fullmatch(n)]
            early = [n for n in others if _EARLY.fullmatch(n)]
            last_early = early[-1] if early else None
            for name in [*early, *(n for n in others if n not in early)]:
                _write(images / name, files.read(name, 0, files.files[name].size))
                if name == last_early:
                    lazy = LazyRestore.begin(p.criu, images, w.name)
            t_files = time.monotonic()
            source = RepositoryPages(files)
            index = prepare_restore_dir(images, source)
            # The pages' chunks located while CRIU runs (another process: ours waits), not
            # sooner: with hints, the small reads above need no search of every index, and a
            # thread searching meanwhile only slowed them down (GIL).
            files.locate_ahead([n for n in files.files if _PAGES.fullmatch(n)])
            t_pages = time.monotonic()
        except DiskImageDamaged:
            raise
        except (StorageError, OSError) as e:
            w.last_error = str(e)
            raise RestoreFailed(
                f"cannot restore {w.name} lazily: {e}", transient=storage_unavailable(e)
            ) from e
        if lazy is None:  # none of them: the daemon says what it makes of that
            lazy = LazyRestore.begin(p.criu, images, w.name)
        inherit = p.log_fds(w, checkpoint_id)
        try:
            ran = True
            lazy.run(
                index,
                source,
                w.dump_options(),
                inherit=inherit,
                on_finish=lambda lr: _finished(w, lr, images, t0, files),
            )
            serving = True
        finally:
            for fd, _ in inherit:
                os.close(fd)
    except BaseException as e:
        if lazy is not None and not ran:
            lazy.cancel()
        if isinstance(files, DiskImageFiles) and not serving:
            files.close()  # a refused `run` calls no `on_finish`: nothing else would
        if isinstance(e, CriuError | RestoreFailed):
            w.last_error = str(e)
        shutil.rmtree(images.parent, ignore_errors=True)
        if lazy is not None and lazy.host_fault is not None and isinstance(e, CriuError):
            raise RestoreFailed(
                f"cannot restore {w.name} lazily: {lazy.host_fault}", transient=True
            ) from e
        raise
    assert lazy.pid is not None
    w.restored_as(lazy.pid)
    slot = None if disk is None else disk.slot
    w.lazy = LazyTransfer(checkpoint_id, lazy, reading_slot=slot, pages=source)
    if lazy.done():  # ended before it was recorded: `_finished` found nothing to clear
        w.lazy = None
    log.info(
        "lazy restore of %s from %s%s: the tree runs as pid %d, %d pages to come on demand "
        "(manifest and first indexes %.2fs, other images %.2fs, %d local pages %.2fs, CRIU %.2fs: "
        "lazy-pages daemon %.2fs, criu restore %.2fs)",
        w.name,
        checkpoint_id,
        "" if disk is None else f" (its disk image, slot {disk.slot})",
        lazy.pid,
        index.lazy_pages,
        t_index - t0,
        t_files - t_index,
        index.local_pages,
        t_pages - t_files,
        time.monotonic() - t_pages,
        *lazy.started_in,
    )
    return lazy.pid, lazy.restore_stats or RestoreStats(0.0, 0.0, 0)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _finished(
    w: Workload, lr: LazyRestore, images: Path, t0: float, files: ImageFiles | None
) -> None:
    """The transfer ended (on the lazy restore's thread): the folder goes; a failure is
    settled by `settle` when the tree's death is handled, or here if that came first."""
    shutil.rmtree(images.parent, ignore_errors=True)
    if isinstance(files, DiskImageFiles):
        files.close()
    stats = lr.stats()
    if lr.done():
        log.info(
            "lazy restore of %s: all pages arrived %.2fs after it began (%d requests)",
            w.name,
            time.monotonic() - t0,
            stats.requests if stats else 0,
        )
        if w.lazy is not None and w.lazy.restore is lr:
            w.lazy = None


def settle(w: Workload) -> bool:
    """Called with the workload's lock before deciding about its death: if a lazy restore of
    it failed, say so in its history and return True (its death is then not a crash loop).
    A checkpoint at fault is marked bad and the next restore is a full one; storage that
    failed leaves it good, to be restored again as it was (see the module docstring)."""
    inflight = w.lazy
    if inflight is None or not inflight.restore.failed():
        return False
    w.lazy = None
    reason = inflight.restore.reason
    why = inflight.restore.host_fault and "this host's own failure, not the checkpoint's"
    why = why or _disk_image_trouble(w, inflight)
    why = why or _storage_trouble(inflight)
    if why is not None:
        w.last_error = f"lazy restore failed ({reason}): {why}"
        w.record(
            RestoreReason.LAZY,
            RestoreResult.RETRY,
            f"lazy restore failed ({reason}); the tree was killed; {why}: the checkpoint "
            "stays good and is restored again",
            inflight.checkpoint,
        )
        return True
    w.lazy_off = True
    if inflight.checkpoint not in w.bad_checkpoints:
        w.mark_bad(inflight.checkpoint)
    w.record(
        RestoreReason.LAZY,
        RestoreResult.FAILED,
        f"lazy restore failed ({reason}); the tree was killed, checkpoint "
        "marked bad, the one before is restored in full",
        inflight.checkpoint,
    )
    return True


def _disk_image_trouble(w: Workload, inflight: LazyInFlight) -> str | None:
    """Why a failed lazy restore from a disk image is not the checkpoint's fault; None if it
    read the repository. Whatever failed, the disk image is forgotten (its slot is written
    again by a later checkpoint) and the next restore is a full one from the repository: a
    checkpoint CRIU truly cannot restore fails that one too, and is marked bad then."""
    if inflight.reading_slot is None:
        return None
    w.disk = [d for d in w.disk if d.slot != inflight.reading_slot]
    w.lazy_off = True
    pages = inflight.pages if isinstance(inflight, LazyTransfer) else None
    if pages is not None and isinstance(pages.error, DiskImageDamaged):
        return "its disk image is damaged, dropped"
    return "its disk image is dropped, the repository's copy restored in full"


def _storage_trouble(inflight: LazyInFlight) -> str | None:
    """Why a failed lazy restore is the storage's fault, not the checkpoint's; None if not.

    Either a page read raised what the storage raises when it is unreachable, or a read took
    at least half the stall timeout: the stall watchdog (30 s) fires before the storage layer
    has used up its retries (attempts x read timeout, 60 s by default) when the bucket stops
    answering, and CRIU's page requests all wait on a read that is still retrying. A stall
    with no slow read (CRIU stopped asking) is not the storage's."""
    pages = inflight.pages if isinstance(inflight, LazyTransfer) else None
    if pages is None:
        return None
    if pages.error is not None:
        if storage_unavailable(pages.error):
            return f"storage unavailable ({type(pages.error).__name__})"
        return None
    stall = float(getattr(inflight.restore, "stall_timeout", 30.0))
    slowest = pages.slowest_read()
    if slowest >= stall / 2:
        return f"storage stalled (a page read waited {slowest:.0f}s)"
    return None
