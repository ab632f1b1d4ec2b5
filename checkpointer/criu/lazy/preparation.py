"""What a lazy restore starts from: a restore folder CRIU accepts with `--lazy-pages`, and
the index of the pages it left out, which the page server answers from.

CRIU decides at dump time which pages may come later (the LAZY flag it writes on every entry
it could restore on demand); `prepare_restore_dir` keeps those out of the folder's pages files
and writes the others, read from a `PageSource` (the repository, or a folder of images).
"""

from __future__ import annotations

import os
import stat
import threading
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from checkpointer.criu.failures import CriuError, CriuFailure
from checkpointer.criu.images.pagemap import (
    FLAG_LAZY,
    FLAG_PARENT,
    FLAG_PRESENT,
    PAGE_SIZE,
    PagemapEntry,
    PagemapError,
    read_pagemap,
    task_pagemaps,
    without_lazy_pages,
    write_pagemap,
)

_COPY_SLICE_PAGES = 256  # 1 MiB per PageSource read when copying the non-lazy pages


class PageSource(Protocol):
    """Where the pages of a checkpoint come from."""

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        """Exactly `nr_pages` pages from `pages-<pages_id>.img` as CRIU dumped it, starting at
        byte `offset` (a multiple of 4096). Called from one thread at a time, possibly not the
        caller's. Raises if a page cannot be fetched or verified; never returns wrong bytes.

        Keyed by the pages image, not by task: CRIU numbers pages images with a counter
        (pagemap-<task>.img names its pages-<N>.img in its head), and shared memory has pages
        images that belong to no task."""
        ...


class NoPagesYet:
    """The page source of a restore between `LazyRestore.begin` and `run`: no request can
    come then (no tree, no userfaultfd), and one that did would fail the restore."""

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        raise LookupError("a page was asked for before the restore began")


class FolderPageSource:
    """Pages read from a folder of CRIU images: a kept local image, or tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[int, int] = {}
        self._lock = threading.Lock()

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        with self._lock:
            fd = self._files.get(pages_id)
            if fd is None:
                fd = os.open(self.folder / f"pages-{pages_id}.img", os.O_RDONLY | os.O_CLOEXEC)
                self._files[pages_id] = fd
        data = os.pread(fd, nr_pages * PAGE_SIZE, offset)
        if len(data) != nr_pages * PAGE_SIZE:
            raise OSError(
                f"pages-{pages_id}.img is shorter than offset {offset} + {nr_pages} pages"
            )
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()


@dataclass(frozen=True)
class LazyRange:
    """A run of lazy pages: where the task had them, and where they are in the pages file."""

    vaddr: int
    nr_pages: int
    pages_id: int
    offset: int


class PageIndex:
    """Answers "where are the pages of task T at address A" for the page server, by bisection
    over each task's sorted ranges (a task has thousands of entries after a long run)."""

    def __init__(self, ranges: Mapping[int, Sequence[LazyRange]], local_pages: int = 0) -> None:
        self._ranges = {task: sorted(rs, key=lambda r: r.vaddr) for task, rs in ranges.items()}
        self._starts = {task: [r.vaddr for r in rs] for task, rs in self._ranges.items()}
        self.lazy_pages = sum(r.nr_pages for rs in self._ranges.values() for r in rs)
        self.local_pages = local_pages

    def locate(self, task: int, vaddr: int, nr_pages: int) -> tuple[int, int, int]:
        """(pages_id, byte offset, pages) for a GET: at most `nr_pages`, never past the range
        (a shorter answer is allowed by the protocol). Raises LookupError if no lazy range of
        `task` holds `vaddr`: CRIU never asks for such a page, so it means wrong images."""
        starts = self._starts.get(task)
        if starts is None:
            raise LookupError(f"task {task} has no lazy pages in these images")
        i = bisect_right(starts, vaddr) - 1
        if i < 0 or nr_pages <= 0 or vaddr % PAGE_SIZE:
            raise LookupError(f"task {task}: no lazy page at {vaddr:#x}")
        r = self._ranges[task][i]
        skip = (vaddr - r.vaddr) // PAGE_SIZE
        if skip >= r.nr_pages:
            raise LookupError(f"task {task}: no lazy page at {vaddr:#x}")
        return r.pages_id, r.offset + skip * PAGE_SIZE, min(nr_pages, r.nr_pages - skip)


def prepare_restore_dir(images_dir: Path, source: PageSource) -> PageIndex:
    """Turn a folder holding every image of a checkpoint except its `pages-*.img` into one
    `criu restore --lazy-pages` accepts, and return the index the page server needs.

    Which pages are lazy is CRIU's own decision at dump time (the LAZY flag it writes on every
    entry it could restore on demand); we only drop PRESENT from those entries and write each
    pages file with the other pages, read from `source`. The folder must not be prepared
    twice (a LAZY entry without PRESENT is refused): the original offsets would be lost."""
    if any(images_dir.glob("pages-*.img")):
        raise CriuError(
            f"{images_dir} already holds pages-*.img; a lazy restore folder gets its pages "
            "from the page source",
            CriuFailure.BAD_IMAGES,
        )
    ranges: dict[int, list[LazyRange]] = {}
    local = 0
    seen_ids: set[int] = set()
    tasks = {p: t for t, p in task_pagemaps(images_dir).items()}
    for path in sorted(images_dir.glob("pagemap-*.img")):
        try:
            pagemap = read_pagemap(path)
        except PagemapError as e:
            raise CriuError(f"cannot prepare a lazy restore: {e}", CriuFailure.BAD_IMAGES) from e
        _refuse_unusable(path, pagemap.entries, pagemap.pages_id, seen_ids)
        task = tasks.get(path)
        with open(images_dir / f"pages-{pagemap.pages_id}.img", "xb") as out:
            for entry, offset in pagemap.present():
                if task is not None and entry.flags & FLAG_LAZY:
                    rng = LazyRange(entry.vaddr, entry.nr_pages, pagemap.pages_id, offset)
                    ranges.setdefault(task, []).append(rng)
                else:
                    _copy_pages(source, pagemap.pages_id, offset, entry.nr_pages, out)
                    local += entry.nr_pages
            out.flush()
            os.fsync(out.fileno())
        if task is not None:
            write_pagemap(path, without_lazy_pages(pagemap))
    return PageIndex(ranges, local)


def _refuse_unusable(
    path: Path, entries: Sequence[PagemapEntry], pages_id: int, seen: set[int]
) -> None:
    for e in entries:
        flags = e.flags
        if flags & FLAG_PARENT:
            raise CriuError(
                f"{path.name}: pages in a parent image; not restorable", CriuFailure.BAD_IMAGES
            )
        if flags & FLAG_LAZY and not flags & FLAG_PRESENT:
            raise CriuError(
                f"{path.name} has lazy pages that are not in the image: the folder was already "
                "prepared, or dumped with --lazy-pages; prepare it from the checkpoint again",
                CriuFailure.BAD_IMAGES,
            )
    if pages_id in seen:
        raise CriuError(f"{path.name}: pages-{pages_id}.img used twice", CriuFailure.BAD_IMAGES)
    seen.add(pages_id)


def _copy_pages(source: PageSource, pages_id: int, offset: int, nr: int, out: BinaryIO) -> None:
    done = 0
    while done < nr:
        n = min(_COPY_SLICE_PAGES, nr - done)
        data = source.read(pages_id, offset + done * PAGE_SIZE, n)
        if len(data) != n * PAGE_SIZE:
            raise CriuError(
                f"page source returned {len(data)} bytes for {n} pages", CriuFailure.BAD_IMAGES
            )
        out.write(data)
        done += n


def check_private_dir(d: Path) -> None:
    """The folder holds lazy-pages.socket, which hands out the tree's memory: root's only."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CriuError(
            f"{d} must be a directory of uid {os.geteuid()} with mode 0700 for a lazy restore",
            CriuFailure.PERMISSION,
        )
