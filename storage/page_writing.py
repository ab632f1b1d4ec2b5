"""Putting one pack's chunks in place: decoded, checked and written in file order.

Each pack is handled whole by one reader thread: read into a buffer it reuses, opened (one
AES-GCM call checks every byte of it), and its pages put in file order: each piece of pages
that follow each other in the file and in the pack is copied (raw) or decoded (frames:
storage/frames.py, one call without the GIL) straight into place, or, where pages repeat or
kinds alternate page by page, decoded in stored order and put in file order with one gather.
Then one pwrite per run of consecutive pages. A repository in clear has no tag, so there each
chunk's BLAKE3 is checked. Where each chunk goes is storage/wanted_chunks.py's to say; the
whole restore is storage/rebuild.py.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from storage.errors import CorruptCheckpoint
from storage.frames import FrameDecoder, FrameError
from storage.manifest import DIGEST_SIZE
from storage.packs import IndexArrays

if TYPE_CHECKING:
    from storage.wanted_chunks import Matches, WantedChunks

# Whole pages decoded and written per step: bounds each thread's two buffers to 8 MiB whatever
# a pack's index says (an ordinary pack holds ~1,000).
_GROUP = 2048


@dataclass
class Units:
    """What holds a pack's whole pages, in stored order: raw pages (one each) and frames (up
    to GROUP_PAGES each), with where each lies and how many pages it decodes to."""

    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    raw: npt.NDArray[np.bool_]
    pages: npt.NDArray[np.int64]


class Scratch(threading.local):
    """Each reader thread's buffers, reused from pack to pack (a fresh 8 MiB would cost more
    in page faults than the copying into it), and its zstd decoding context."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self._buffers: dict[str, bytearray] = {}

    def buffer(self, name: str, size: int) -> bytearray:
        buf = self._buffers.get(name)
        if buf is None or len(buf) < size:
            # A new one, never a resized one: numpy views of the old may still be alive. With
            # room: a pack is its 4 MiB target plus the chunk that filled it, give or take.
            buf = self._buffers[name] = bytearray(max(size + size // 4, 5 * 1024 * 1024))
        return buf

    def pack_buffer(self, size: int) -> bytearray:
        return self.buffer("pack", size)


def write_pack(
    wanted: WantedChunks,
    fds: list[int],
    pack_id: str,
    index: IndexArrays,
    m: Matches,
    data: bytes | memoryview,
    scratch: Scratch,
    chunk_id: Any,
    where: str,
) -> int:
    """Decode, check and write the chunks of a pack that `m` claimed (for `wanted`); bytes
    written. `chunk_id` re-hashes each chunk (a repository in clear), or is None (the pack's
    tag vouched for it: its index says which digest each stored chunk has)."""
    corrupt = f"{where} is corrupt: pack {pack_id}"
    needed, inverse = np.unique(m.entries, return_inverse=True)
    first = np.empty(len(needed), dtype=np.int64)
    first[inverse] = m.positions  # a position of each entry (its size: equal chunks)
    sizes = wanted.sizes[first].astype(np.int64)
    offsets = index.offsets[needed].astype(np.int64)
    lengths = index.lengths[needed].astype(np.int64)
    raw = index.raw[needed]
    slots = index.slots[needed].astype(np.int64)
    frame_pages = index.frame_pages()[needed]
    if len(needed) and int((offsets + lengths).max()) > len(data):
        raise CorruptCheckpoint(f"{corrupt} is truncated")
    if (raw & (lengths != sizes)).any():
        raise CorruptCheckpoint(f"{corrupt} has a raw chunk of the wrong size")
    short = sizes != wanted.chunk_size
    if (short & (frame_pages != 1)).any():
        raise CorruptCheckpoint(f"{corrupt} has a short chunk in a frame of pages")
    digests = np.frombuffer(index.digests, dtype=f"V{DIGEST_SIZE}")[needed]
    step = _Step(wanted, fds, m, inverse, digests, data, scratch, chunk_id, corrupt)
    # The whole pages by what holds them (a raw page, or a frame of up to GROUP_PAGES),
    # in the order those are stored; each unit decoded once however many of its pages
    # this checkpoint needs.
    whole = np.flatnonzero(~short)
    _, first_of_unit, unit_of = np.unique(
        offsets[whole] * 2 + raw[whole], return_index=True, return_inverse=True
    )
    units = whole[first_of_unit]  # an entry of each unit
    unit_pages = frame_pages[units]
    written = 0
    ends = np.cumsum(unit_pages)
    # Steps of about _GROUP pages, whole units each (a frame is 16 pages at most).
    cuts = np.searchsorted(
        ends, np.arange(_GROUP, int(ends[-1]) if len(ends) else 0, _GROUP), side="right"
    )
    bounds = [0, *np.unique(cuts).tolist(), len(units)]
    for ua, ub in itertools.pairwise(bounds):
        if ua == ub:
            continue
        in_step = (unit_of >= ua) & (unit_of < ub)
        sel = whole[in_step]
        u = units[ua:ub]
        written += step.pages(
            sel,
            unit_of[in_step] - ua,
            slots[sel],
            Units(offsets[u], lengths[u], raw[u], unit_pages[ua:ub]),
        )
    # A file's last chunk, shorter than a page: one at a time (a handful per checkpoint).
    for k in np.flatnonzero(sizes != wanted.chunk_size).tolist():
        written += step.short(
            k,
            int(offsets[k]),
            int(lengths[k]),
            bool(raw[k]),
            int(sizes[k]),
            digests[k].tobytes(),
        )
    return written


class _Step:
    """Writing one pack's pages: what every group of them shares."""

    def __init__(
        self,
        wanted: WantedChunks,
        fds: list[int],
        m: Matches,
        inverse: npt.NDArray[np.int64],
        digests: npt.NDArray[Any],
        data: bytes | memoryview,
        scratch: Scratch,
        chunk_id: Any,
        corrupt: str,
    ) -> None:
        self.w, self.fds, self.m, self.inverse = wanted, fds, m, inverse
        self.digests, self.needed = digests, len(digests)  # of each needed entry
        self.data = memoryview(data)
        self.scratch, self.chunk_id, self.corrupt = scratch, chunk_id, corrupt

    def pages(
        self,
        sel: npt.NDArray[np.int64],
        unit_of: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
        units: Units,
    ) -> int:
        """Whole pages `sel` (needed entries; each in unit `unit_of` of `units`, at `slots`):
        decoded, checked, put in file order and written run by run."""
        cs, total = self.w.chunk_size, int(units.pages.sum())
        unit_at = np.cumsum(units.pages) - units.pages  # each unit's first page, decoded
        # Every place each page goes, in file order: `rows[k]` is the decoded page of the k-th.
        row = np.full(self.needed, -1, dtype=np.int64)
        row[sel] = unit_at[unit_of] + slots
        rows = row[self.inverse]
        keep = np.flatnonzero(rows >= 0)
        keep = keep[np.argsort(self.m.positions[keep])]
        rows, positions = rows[keep], self.m.positions[keep]
        # Runs of units stored back to back and of one kind: one copy or one decode each.
        run_breaks = (units.raw[1:] != units.raw[:-1]) | (
            units.offsets[1:] != units.offsets[:-1] + units.lengths[:-1]
        )
        direct = self._direct(rows, total, unit_at, units, run_breaks)
        if direct is not None and len(direct) == 1 and units.raw[0]:
            # All raw and in order (random memory, a first checkpoint): written from the pack.
            at = int(units.offsets[0])
            src = self.data[at : at + total * cs]
        elif direct is not None:
            # Each page once, and each unit's pages in file order (a first checkpoint):
            # decoded straight into place, piece by piece.
            out = self.scratch.buffer("out", total * cs)
            for a, b, at in direct:
                self._decode(out, at, units, a, b)
            src = memoryview(out)[: total * cs]
        else:
            # Pages repeated, or not all of a frame needed: decoded in stored order, then
            # gathered.
            stage = self.scratch.buffer("stage", total * cs)
            bounds = [0, *(np.flatnonzero(run_breaks) + 1).tolist(), len(units.pages)]
            for a, b in itertools.pairwise(bounds):
                self._decode(stage, int(unit_at[a]), units, a, b)
            out = self.scratch.buffer("out", len(rows) * cs)
            out_rows = np.frombuffer(out, dtype=f"V{cs}", count=len(rows))
            # mode="clip": with the default, numpy copies into a temporary first (the rows
            # are in range by construction).
            pages = np.frombuffer(stage, dtype=f"V{cs}", count=total)
            np.take(pages, rows, out=out_rows, mode="clip")
            del out_rows, pages
            src = memoryview(out)[: len(rows) * cs]
        if self.chunk_id is not None:  # each place against the digest its entry names
            self._check(src, self.digests[self.inverse[keep]])
        return self._write_runs(src, positions)

    @staticmethod
    def _direct(
        rows: npt.NDArray[np.int64],
        total: int,
        unit_at: npt.NDArray[np.int64],
        units: Units,
        run_breaks: npt.NDArray[np.bool_],
    ) -> list[tuple[int, int, int]] | None:
        """(first unit, end unit, page in file order) of pieces that decode straight into
        file order, or None: only when every decoded page goes to exactly one place, each
        unit's pages in order, in few pieces."""
        if len(rows) != total:
            return None
        place = np.full(total, -1, dtype=np.int64)
        place[rows] = np.arange(total)
        if (place < 0).any():
            return None  # a page twice, so another not at all
        follows = np.diff(place) == 1
        inside = np.ones(max(total - 1, 0), dtype=bool)
        inside[unit_at[1:] - 1] = False  # the step from a unit's last page to the next's first
        if not follows[inside].all():
            return None
        # Units join a piece when their kind and storage runs on and so does the file order.
        joins = ~run_breaks & follows[unit_at[1:] - 1]
        starts = [0, *(np.flatnonzero(~joins) + 1).tolist()]
        if len(starts) > max(4, total // 8):
            return None
        ends = [*starts[1:], len(units.pages)]
        return [(a, b, int(place[unit_at[a]])) for a, b in zip(starts, ends, strict=True)]

    def _decode(self, dst: bytearray, at: int, units: Units, a: int, b: int) -> None:
        """Units `a` to `b` (back to back in the pack, of one kind) into `dst` from page
        `at`: one copy, or one decode of their frames."""
        cs = self.w.chunk_size
        start = int(units.offsets[a])
        if units.raw[a]:  # (through a memoryview: bytearray slice assignment copies twice)
            count = b - a
            memoryview(dst)[at * cs : (at + count) * cs] = self.data[start : start + count * cs]
            return
        try:
            self.scratch.decoder.decode_into(
                dst, at * cs, self.data, units.offsets[a:b], units.lengths[a:b],
                units.pages[a:b] * cs,
            )  # fmt: skip
        except FrameError as err:
            raise self._undecodable(err) from err

    def short(self, k: int, offset: int, length: int, raw: bool, size: int, digest: bytes) -> int:
        """A chunk shorter than a page (a file's last), written to each place it goes."""
        if raw:
            chunk: bytes | bytearray | memoryview = self.data[offset : offset + length]
        else:
            buf = bytearray(size)
            try:
                self.scratch.decoder.decode_into(
                    buf, 0, self.data, np.array([offset]), np.array([length]), np.array([size])
                )
            except FrameError as err:
                raise self._undecodable(err) from err
            chunk = buf
        if self.chunk_id is not None and self.chunk_id(chunk) != digest:
            raise self._mismatch(digest)
        written = 0
        for pos in self.m.positions[self.inverse == k].tolist():
            f = int(np.searchsorted(self.w.file_starts, pos, side="right")) - 1
            offset_in_file = (pos - int(self.w.file_starts[f])) * self.w.chunk_size
            written += pwrite_all(self.fds[f], chunk, offset_in_file)
        return written

    def _check(self, src: memoryview, digests: npt.NDArray[Any]) -> None:
        cs = self.w.chunk_size
        expected = digests.tobytes()
        got = b"".join([self.chunk_id(src[o : o + cs]) for o in range(0, len(src), cs)])
        if got != expected:
            bad = next(
                i for i in range(len(digests)) if got[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                != expected[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            )  # fmt: skip
            raise self._mismatch(expected[bad * DIGEST_SIZE : (bad + 1) * DIGEST_SIZE])

    def _mismatch(self, digest: bytes) -> CorruptCheckpoint:
        return CorruptCheckpoint(
            f"{self.corrupt} has chunk {digest[:8].hex()}, which does not match its hash; "
            "restore an older checkpoint (see `checkpointer list`)"
        )

    def _undecodable(self, err: FrameError) -> CorruptCheckpoint:
        return CorruptCheckpoint(
            f"{self.corrupt} has a chunk that does not decompress ({err}); restore an older "
            "checkpoint (see `checkpointer list`)"
        )

    def _write_runs(self, src: memoryview, positions: npt.NDArray[np.int64]) -> int:
        """`src` holds the pages of `positions` (sorted) back to back: one pwrite per run of
        consecutive pages of one file."""
        cs, starts = self.w.chunk_size, self.w.file_starts
        files = np.searchsorted(starts, positions, side="right") - 1
        breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(files) != 0)) + 1
        written = 0
        for a, b in itertools.pairwise([0, *breaks.tolist(), len(positions)]):
            f = int(files[a])
            at = (int(positions[a]) - int(starts[f])) * cs
            written += pwrite_all(self.fds[f], src[a * cs : b * cs], at)
        return written


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """pwrite until every byte is written (a short write is legal, if rare on local files)."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done
