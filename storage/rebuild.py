"""Rebuilding image files from packs: where each chunk of a checkpoint goes, and putting it there.

A 1 GB image is 262,144 chunks; nothing here does Python work per chunk of an encrypted
repository. The manifest's digests are sorted once and a whole pack's index is matched against
them in one vectorised search. Each pack is then handled whole by one reader thread: read
into a buffer it reuses, opened (one AES-GCM call checks every byte of it), and its pages put in
file order: each piece of pages that follow each other in the file and in the pack is copied
(raw) or decoded (frames: storage/frames.py, one call without the GIL) straight into place, or,
where pages repeat or kinds alternate page by page, decoded in stored order and put in file
order with one gather. Then one pwrite per run of consecutive pages. Packs are decoded on every
core at once. A repository in clear has no tag, so there each chunk's BLAKE3 is checked.

Zero pages are never fetched: the files are created sparse at their size, so a chunk whose
digest is that of a zero page already reads back as what it is.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from storage.chunk_index import digest_rows
from storage.errors import CorruptCheckpoint
from storage.file_copy import copy_range
from storage.frames import FrameDecoder, FrameError
from storage.manifest import DIGEST_SIZE, Manifest
from storage.packs import IndexArrays

if TYPE_CHECKING:
    from storage.repository import ProgressFn, Repository

# Whole pages decoded and written per step: bounds each thread's two buffers to 8 MiB whatever
# a pack's index says (an ordinary pack holds ~1,000).
_GROUP = 2048
Sizes = npt.NDArray[np.uint64]


@dataclass
class Matches:
    """Pairs (pack index entry, manifest position) of a pack's chunks a checkpoint needs."""

    entries: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]


@dataclass
class _Units:
    """What holds a pack's whole pages, in stored order: raw pages (one each) and frames (up
    to GROUP_PAGES each), with where each lies and how many pages it decodes to."""

    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    raw: npt.NDArray[np.bool_]
    pages: npt.NDArray[np.int64]


class _Scratch(threading.local):
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


class WantedChunks:
    """Where each chunk of a manifest goes, found for a whole pack at once.

    The manifest's digests, sorted, are binary-searched with a pack's index in one vectorised
    call: no Python object per chunk, so a restore's memory stays flat whatever the image size.
    A chunk that appears several times (zero pages) is written to every place it belongs.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.chunk_size = manifest.chunk_size
        self.rows = digest_rows(b"".join(f.digests for f in manifest.files))
        counts = [len(f.digests) // DIGEST_SIZE for f in manifest.files]
        self.file_starts = np.cumsum([0, *counts])[:-1]
        self.order = np.argsort(self.rows[:, 0])
        self.keys = self.rows[self.order, 0]
        self.done = np.zeros(len(self.rows), dtype=bool)
        self._claiming = threading.Lock()  # reader threads claim what they will write
        # The size of the chunk at each position: whole chunks but a file's last one. Given to
        # zstd, it bounds what a damaged frame header could make the decompressor allocate.
        self.sizes = np.full(len(self.rows), self.chunk_size, dtype="<u8")
        for start, count, f in zip(self.file_starts.tolist(), counts, manifest.files, strict=True):
            if count:
                self.sizes[start + count - 1] = f.size - (count - 1) * self.chunk_size

    def find(self, pack_digests: bytes) -> Matches:
        q = digest_rows(pack_digests)
        # Searched in sorted order: numpy narrows each search from the one before (measured
        # 6% of a restore's CPU time searched in a pack's order).
        by_key = np.argsort(q[:, 0])
        lo, hi = np.empty(len(q), dtype=np.int64), np.empty(len(q), dtype=np.int64)
        lo[by_key] = np.searchsorted(self.keys, q[by_key, 0], side="left")
        hi[by_key] = np.searchsorted(self.keys, q[by_key, 0], side="right")
        counts = hi - lo
        total = int(counts.sum())
        entries = np.repeat(np.arange(len(q)), counts)
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        positions = self.order[np.arange(total) + starts]
        # Full digests equal, and not already written (from a seed folder): a pack whose
        # chunks are all written is then neither read nor decompressed.
        keep = (self.rows[positions] == q[entries]).all(axis=1) & ~self.done[positions]
        return Matches(entries[keep], positions[keep])

    def claim(self, m: Matches) -> Matches:
        """The matches not written yet (a chunk may be held by more than one pack)."""
        with self._claiming:
            fresh = ~self.done[m.positions]
            out = Matches(m.entries[fresh], m.positions[fresh])
            self.done[out.positions] = True
        return out

    def skip_zero_pages(self, zero_digest: bytes) -> int:
        """Mark written the whole pages whose digest is the zero page's (a file created at its
        size reads back zeros there already); their bytes."""
        zero = digest_rows(zero_digest)[0]
        skip = (self.rows == zero).all(axis=1) & (self.sizes == self.chunk_size) & ~self.done
        self.done |= skip
        return int(skip.sum()) * self.chunk_size

    def write_pack(
        self,
        fds: list[int],
        pack_id: str,
        index: IndexArrays,
        m: Matches,
        data: bytes | memoryview,
        scratch: _Scratch,
        chunk_id: Any,
        where: str,
    ) -> int:
        """Decode, check and write the chunks of a pack that `m` claimed; bytes written.
        `chunk_id` re-hashes each chunk (a repository in clear), or is None (the pack's tag
        vouched for it: its index says which digest each stored chunk has)."""
        corrupt = f"{where} is corrupt: pack {pack_id}"
        needed, inverse = np.unique(m.entries, return_inverse=True)
        first = np.empty(len(needed), dtype=np.int64)
        first[inverse] = m.positions  # a position of each entry (its size: equal chunks)
        sizes = self.sizes[first].astype(np.int64)
        offsets = index.offsets[needed].astype(np.int64)
        lengths = index.lengths[needed].astype(np.int64)
        raw = index.raw[needed]
        slots = index.slots[needed].astype(np.int64)
        frame_pages = index.frame_pages()[needed]
        if len(needed) and int((offsets + lengths).max()) > len(data):
            raise CorruptCheckpoint(f"{corrupt} is truncated")
        if (raw & (lengths != sizes)).any():
            raise CorruptCheckpoint(f"{corrupt} has a raw chunk of the wrong size")
        short = sizes != self.chunk_size
        if (short & (frame_pages != 1)).any():
            raise CorruptCheckpoint(f"{corrupt} has a short chunk in a frame of pages")
        digests = np.frombuffer(index.digests, dtype=f"V{DIGEST_SIZE}")[needed]
        step = _Step(self, fds, m, inverse, digests, data, scratch, chunk_id, corrupt)
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
                _Units(offsets[u], lengths[u], raw[u], unit_pages[ua:ub]),
            )
        # A file's last chunk, shorter than a page: one at a time (a handful per checkpoint).
        for k in np.flatnonzero(sizes != self.chunk_size).tolist():
            written += step.short(
                k,
                int(offsets[k]),
                int(lengths[k]),
                bool(raw[k]),
                int(sizes[k]),
                digests[k].tobytes(),
            )
        return written

    def copy_from_seed(self, fds: list[int], seed: Manifest, folder: Path, sizes: list[int]) -> int:
        """Write every chunk that `folder` (the files of checkpoint `seed`, whose bytes the
        caller vouches for) already holds, copying runs in the kernel; bytes written.

        A rollback to the previous checkpoint shares ~90% of its pages with the newest one,
        which is kept on tmpfs: those need no download, no decompression and no re-hash. The
        folder being rebuilt may be on another filesystem (disk, when tmpfs lacks room):
        copy_range falls back to sendfile there."""
        rows = digest_rows(b"".join(f.digests for f in seed.files))
        # Each distinct chunk once (zero pages repeat thousands of times: pairing every copy
        # in the seed with every place it goes would be quadratic).
        order = np.argsort(rows[:, 0])
        repeat = np.zeros(len(order), dtype=bool)
        repeat[1:] = (rows[order[1:]] == rows[order[:-1]]).all(axis=1)
        first = order[~repeat]
        m = self.find(rows[first].tobytes())
        m = self.claim(Matches(first[m.entries], m.positions))
        if not len(m.entries):
            return 0
        seed_starts = np.cumsum([0, *(len(f.digests) // DIGEST_SIZE for f in seed.files)])[:-1]
        order = np.argsort(m.positions)
        dst, src = m.positions[order], m.entries[order]
        dst_files = np.searchsorted(self.file_starts, dst, side="right") - 1
        src_files = np.searchsorted(seed_starts, src, side="right") - 1
        breaks = (
            np.flatnonzero(
                (np.diff(dst) != 1)
                | (np.diff(src) != 1)
                | (np.diff(dst_files) != 0)
                | (np.diff(src_files) != 0)
            )
            + 1
        )
        written = 0
        src_fds: dict[int, int] = {}
        try:
            for start, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(dst)], strict=True):
                fi, si = int(dst_files[start]), int(src_files[start])
                if si not in src_fds:
                    src_fds[si] = os.open(folder / seed.files[si].name, os.O_RDONLY)
                dst_off = (int(dst[start]) - int(self.file_starts[fi])) * self.chunk_size
                src_off = (int(src[start]) - int(seed_starts[si])) * self.chunk_size
                length = min((end - start) * self.chunk_size, sizes[fi] - dst_off)
                written += copy_range(src_fds[si], fds[fi], length, src_off, dst_off)
        finally:
            for fd in src_fds.values():
                os.close(fd)
        return written

    def check_complete(self, where: str) -> None:
        if not self.done.all():
            first = int(np.flatnonzero(~self.done)[0])
            raise CorruptCheckpoint(
                f"{where} is incomplete: {int((~self.done).sum())} chunk(s) (first "
                f"{self.rows[first].tobytes().hex()[:16]}) are in none of its packs; restore "
                "an older checkpoint"
            )


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
        scratch: _Scratch,
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
        units: _Units,
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
        units: _Units,
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

    def _decode(self, dst: bytearray, at: int, units: _Units, a: int, b: int) -> None:
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


def materialize(
    repo: Repository,
    workload: str,
    checkpoint_id: str,
    dest: Path,
    progress: ProgressFn | None = None,
    seed: tuple[str, Path] | None = None,
) -> Manifest:
    """Rebuild a checkpoint's folder in `dest`: see Repository.materialize."""
    manifest = repo.read_manifest(workload, checkpoint_id)
    where = f"checkpoint {checkpoint_id} of {workload}"
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Files are created relative to the folder's descriptor, by flat name, never following
    # a symlink: a name in a manifest can only ever land inside `dest`.
    dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    fds: list[int] = []
    try:
        os.fchmod(dir_fd, 0o700)
        for entry in manifest.files:
            if "/" in entry.name or entry.name in (".", ".."):
                raise CorruptCheckpoint(f"{where}: unsafe file name {entry.name!r}")
            fd = os.open(
                entry.name,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                0o600,
                dir_fd=dir_fd,
            )
            fds.append(fd)
            os.ftruncate(fd, entry.size)
        wanted = WantedChunks(manifest)
        zeros = wanted.skip_zero_pages(repo.codec.chunk_id(bytes(manifest.chunk_size)))
        if progress and zeros:
            progress(zeros)
        if seed is not None:
            copied = wanted.copy_from_seed(
                fds,
                repo.read_manifest(workload, seed[0]),
                seed[1],
                [f.size for f in manifest.files],
            )
            if progress:
                progress(copied)
        # An encrypted repository's tag vouches for every chunk of a pack; in clear, each
        # chunk is hashed again.
        chunk_id = None if repo.codec.authenticates else repo.codec.chunk_id
        scratch = _Scratch()
        # `concurrency` packs are fetched at once (a bucket's latency wants several), but only
        # one per core is decoded and written: more only contend for the cores and the caches.
        # A thread that has its pack gives its fetching slot up before it waits for a core, so
        # `concurrency` downloads stay in flight while packs are decoded: a link to a bucket
        # is never left idle by the decoding.
        n_cores = min(repo.concurrency, os.cpu_count() or 1)
        fetching = threading.BoundedSemaphore(repo.concurrency)
        cores = threading.BoundedSemaphore(n_cores)

        def rebuild(pack_id: str) -> int:
            """Read, open, decode and write (in a reader thread) what a pack holds for this
            checkpoint; bytes written."""
            with fetching:
                index = repo.index_for(pack_id, manifest.pack_home, where)
                matches = wanted.find(index.digests)
                if not len(matches.entries):
                    return 0  # a pack whose chunks are all written (or zero pages) is not read
                data = repo.pack_for(pack_id, manifest.pack_home, where, scratch.pack_buffer)
            claimed = wanted.claim(matches)
            if not len(claimed.entries):
                return 0
            with cores:
                return wanted.write_pack(
                    fds, pack_id, index, claimed, data, scratch, chunk_id, where
                )

        threads = repo.concurrency + n_cores
        with ThreadPoolExecutor(threads, thread_name_prefix="pack-reader") as pool:
            # Packs go to whichever thread is free; a few queued per thread keep them busy
            # (memory is each thread's buffers, not the queue).
            packs = iter(manifest.packs)
            pending = {pool.submit(rebuild, p) for p in itertools.islice(packs, 4 * threads)}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        done = fut.result()
                        if progress and done:
                            progress(done)
                    pending |= {
                        pool.submit(rebuild, p) for p in itertools.islice(packs, len(finished))
                    }
            finally:
                for fut in pending:
                    fut.cancel()
        wanted.check_complete(where)
        for fd, entry in zip(fds, manifest.files, strict=True):
            os.fsync(fd)
            os.fchmod(fd, entry.mode & 0o700 or 0o600)
    finally:
        for fd in fds:
            os.close(fd)
        os.close(dir_fd)
    return manifest
