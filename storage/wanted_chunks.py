"""Where each chunk of a checkpoint goes: the manifest's digests against a pack's index.

A 1 GB image is 262,144 chunks; nothing here does Python work per chunk. The manifest's
digests are sorted once and a whole pack's index is matched against them in one vectorised
search; reader threads claim what they will write, so a chunk held by two packs is written
once. Chunks a kept folder of another checkpoint already holds are copied from it in the
kernel. Putting a pack's chunks in place is storage/page_writing.py's job.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from storage import page_writing
from storage.chunk_index import digest_rows
from storage.errors import CorruptCheckpoint
from storage.file_copy import copy_range
from storage.manifest import DIGEST_SIZE, Manifest


@dataclass
class Matches:
    """Pairs (pack index entry, manifest position) of a pack's chunks a checkpoint needs."""

    entries: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]


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

    # Decode, check and write the chunks of a pack that a Matches claimed; bytes written
    # (storage/page_writing.py): a method, so that `wanted.write_pack(...)` reads as before.
    write_pack = page_writing.write_pack

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
