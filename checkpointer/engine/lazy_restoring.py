"""A lazy restore from the repository (`restore.lazy`): the tree runs before its memory is back.

Every image but the pages is rebuilt (a few MB), then CRIU restores the tree with its private
anonymous memory missing; our page server fetches each page from the repository when the
tree touches it or the background transfer asks for it, verified as a full restore verifies
it. The restore returns as soon as the tree runs.

A page that cannot be fetched or verified kills the tree (checkpointer.criu.lazy holds its
userfaultfds, so it never runs on zero pages); its death then reaches the restore policy like
any crash, which finds the checkpoint marked bad here and restores the one before, fully.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from checkpointer.criu import CriuError, RestoreStats
from checkpointer.criu.lazy import LazyRestore, prepare_restore_dir
from checkpointer.engine.workload import LazyInFlight, RestoreResult, Workload
from checkpointer.errors import RestoreFailed
from storage import StorageError
from storage.file_reader import CheckpointFiles

if TYPE_CHECKING:
    from checkpointer.engine.restoring import RestorePipeline

log = logging.getLogger(__name__)

_PAGES = re.compile(r"pages-(\d+)\.img")
_EARLY = re.compile(r"(inventory|pstree|core-\d+|ids-\d+)\.img")


class RepositoryPages:
    """CRIU's pages-N.img of one checkpoint, page ranges fetched from the repository."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        data = self.files.read(f"pages-{pages_id}.img", offset, nr_pages * 4096)
        if len(data) != nr_pages * 4096:
            raise StorageError(f"pages-{pages_id}.img ends before page {offset // 4096 + nr_pages}")
        return data


def start(p: RestorePipeline, w: Workload, checkpoint_id: str) -> tuple[int, RestoreStats]:
    """Start the lazy restore of `checkpoint_id`; the restored root's PID once it runs."""
    t0 = time.monotonic()
    images = p.scratch.new(w.name, "lazy")
    lazy: LazyRestore | None = None
    ran = False  # LazyRestore.run undoes its own failures; before it, they are undone here
    try:
        try:
            files = CheckpointFiles(p.repo, w.name, checkpoint_id, p.repo.known_chunks())
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
        except (StorageError, OSError) as e:
            w.last_error = str(e)
            raise RestoreFailed(
                f"cannot restore {w.name} lazily: {e}", transient=isinstance(e, OSError)
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
                on_finish=lambda lr: _finished(w, lr, images, t0),
            )
        finally:
            for fd, _ in inherit:
                os.close(fd)
    except BaseException as e:
        if lazy is not None and not ran:
            lazy.cancel()
        if isinstance(e, CriuError | RestoreFailed):
            w.last_error = str(e)
        shutil.rmtree(images.parent, ignore_errors=True)
        raise
    assert lazy.pid is not None
    from checkpointer.engine.restoring import running

    running(w, lazy.pid)
    w.lazy = LazyInFlight(checkpoint_id, lazy)
    log.info(
        "lazy restore of %s from %s: the tree runs as pid %d, %d pages to come on demand "
        "(manifest and first indexes %.2fs, other images %.2fs, %d local pages %.2fs, CRIU %.2fs: "
        "lazy-pages daemon %.2fs, criu restore %.2fs)",
        w.name,
        checkpoint_id,
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


def _finished(w: Workload, lr: LazyRestore, images: Path, t0: float) -> None:
    """The transfer ended (on the lazy restore's thread): the folder goes; a failure is
    settled by `settle` when the tree's death is handled, or here if that came first."""
    shutil.rmtree(images.parent, ignore_errors=True)
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
    it failed, its checkpoint is marked bad and the next restore is a full one. True if so."""
    inflight = w.lazy
    if inflight is None or not inflight.restore.failed():
        return False
    w.lazy = None
    w.lazy_off = True
    if inflight.checkpoint not in w.bad_checkpoints:
        w.mark_bad(inflight.checkpoint)
    w.record(
        "lazy",
        RestoreResult.FAILED,
        f"lazy restore failed ({inflight.restore.reason}); the tree was killed, checkpoint "
        "marked bad, the one before is restored in full",
        inflight.checkpoint,
    )
    return True
