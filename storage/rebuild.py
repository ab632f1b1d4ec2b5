"""Rebuilding image files from packs: where each chunk of a checkpoint goes, and putting it there.

A 1 GB image is 262,144 chunks. Mapping each digest to its places with Python objects cost
~60 MB and most of a restore's time, so the manifest's digests are sorted once and a whole
pack's index is matched against them in one vectorised search. Decompression runs in the
reader threads (zstd releases the GIL); the caller's thread verifies every chunk's BLAKE3 and
writes runs of consecutive pages with one pwritev each.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np
import numpy.typing as npt
import zstandard

from storage.chunk_index import digest_rows
from storage.errors import CorruptCheckpoint
from storage.manifest import DIGEST_SIZE, Manifest
from storage.packs import IndexArrays

if TYPE_CHECKING:
    from storage.repository import ProgressFn, Repository

_IOV_MAX = 1024  # buffers per pwritev (Linux's IOV_MAX)
Sizes = npt.NDArray[np.uint64]


@dataclass
class PackChunks:
    """The chunks of one pack a checkpoint needs, decompressed (`chunks[k]` is the chunk of
    index entry `needed[k]`)."""

    pack_id: str
    index: IndexArrays
    matches: Matches
    needed: npt.NDArray[np.int64]
    chunks: Any  # zstandard.BufferWithSegmentsCollection


def decompress_pack(
    pack_id: str,
    index: IndexArrays,
    m: Matches,
    data: bytes | memoryview,
    where: str,
    sizes: Sizes,
) -> PackChunks:
    """Decompress the frames of the matched chunks; `sizes` is each manifest position's
    chunk size (the decompressor allocates exactly that, whatever a frame header says)."""
    corrupt = f"{where} is corrupt: pack {pack_id}"
    needed, first = np.unique(m.entries, return_index=True)
    segments = np.empty((len(needed), 2), dtype="<u8")
    segments[:, 0] = index.offsets[needed]
    segments[:, 1] = index.lengths[needed]
    if int((segments[:, 0] + segments[:, 1]).max()) > len(data):
        raise CorruptCheckpoint(f"{corrupt} is truncated")
    try:
        chunks = zstandard.ZstdDecompressor().multi_decompress_to_buffer(
            zstandard.BufferWithSegments(data, segments.tobytes()),
            decompressed_sizes=sizes[m.positions[first]].tobytes(),
            threads=1,
        )
    except (zstandard.ZstdError, ValueError) as err:  # ValueError: a damaged frame header
        raise CorruptCheckpoint(
            f"{corrupt} has a chunk that does not decompress ({err}); restore an older "
            "checkpoint (see `checkpointer list`)"
        ) from err
    return PackChunks(pack_id, index, m, needed, chunks)


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

    def __init__(self, manifest: Manifest, verify: bool = True) -> None:
        self.chunk_size = manifest.chunk_size
        # False when the codec authenticates every pack and index (the AEAD tag proves each
        # frame is what a key holder wrote for that digest): no per-chunk re-hash needed.
        self.verify = verify
        self.rows = digest_rows(b"".join(f.digests for f in manifest.files))
        counts = [len(f.digests) // DIGEST_SIZE for f in manifest.files]
        self.file_starts = np.cumsum([0, *counts])[:-1]
        self.order = np.argsort(self.rows[:, 0], kind="stable")
        self.keys = self.rows[self.order, 0]
        self.done = np.zeros(len(self.rows), dtype=bool)
        # The size of the chunk at each position: whole chunks but a file's last one. Given to
        # zstd, it bounds what a damaged frame header could make the decompressor allocate.
        self.sizes = np.full(len(self.rows), self.chunk_size, dtype="<u8")
        for start, count, f in zip(self.file_starts.tolist(), counts, manifest.files, strict=True):
            if count:
                self.sizes[start + count - 1] = f.size - (count - 1) * self.chunk_size

    def find(self, pack_digests: bytes) -> Matches:
        q = digest_rows(pack_digests)
        lo = np.searchsorted(self.keys, q[:, 0], side="left")
        hi = np.searchsorted(self.keys, q[:, 0], side="right")
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
        fresh = ~self.done[m.positions]
        out = Matches(m.entries[fresh], m.positions[fresh])
        self.done[out.positions] = True
        return out

    def write(self, fds: list[int], p: PackChunks, where: str) -> int:
        """Verify and write a pack's chunks not written yet; bytes written."""
        m = self.claim(p.matches)
        if not len(m.entries):
            return 0
        slot = np.searchsorted(p.needed, m.entries)
        digests = p.index.digests
        for k in np.unique(slot).tolist() if self.verify else ():
            e = int(p.needed[k])
            expected = digests[e * DIGEST_SIZE : (e + 1) * DIGEST_SIZE]
            if blake3.blake3(p.chunks[k]).digest() != expected:
                raise CorruptCheckpoint(
                    f"{where} is corrupt: chunk {expected[:8].hex()} in pack {p.pack_id} "
                    "does not match its hash; restore an older checkpoint "
                    "(see `checkpointer list`)"
                )
        chunks = p.chunks
        # Chunks that follow each other in a file go down in one pwritev (a first checkpoint's
        # packs hold runs of consecutive pages): far fewer system calls than one per chunk.
        order = np.argsort(m.positions, kind="stable")
        positions, slots = m.positions[order], slot[order]
        files = np.searchsorted(self.file_starts, positions, side="right") - 1
        offsets = (positions - self.file_starts[files]) * self.chunk_size
        breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(files) != 0)) + 1
        written = 0
        for start, end in zip(
            [0, *breaks.tolist()], [*breaks.tolist(), len(positions)], strict=True
        ):
            fd, offset = fds[int(files[start])], int(offsets[start])
            for lo in range(start, end, _IOV_MAX):
                hi = min(end, lo + _IOV_MAX)
                buffers = [chunks[k] for k in slots[lo:hi].tolist()]
                written += pwritev_all(fd, buffers, offset + (lo - start) * self.chunk_size)
        return written

    def copy_from_seed(self, fds: list[int], seed: Manifest, folder: Path, sizes: list[int]) -> int:
        """Write every chunk that `folder` (the files of checkpoint `seed`, whose bytes the
        caller vouches for) already holds, copying runs in the kernel; bytes written.

        A rollback to the previous checkpoint shares ~90% of its pages with the newest one,
        which is kept on tmpfs: those need no download, no decompression and no re-hash."""
        rows = digest_rows(b"".join(f.digests for f in seed.files))
        # Each distinct chunk once (zero pages repeat thousands of times: pairing every copy
        # in the seed with every place it goes would be quadratic).
        order = np.argsort(rows[:, 0], kind="stable")
        repeat = np.zeros(len(order), dtype=bool)
        repeat[1:] = (rows[order[1:]] == rows[order[:-1]]).all(axis=1)
        first = order[~repeat]
        m = self.find(rows[first].tobytes())
        m = self.claim(Matches(first[m.entries], m.positions))
        if not len(m.entries):
            return 0
        seed_starts = np.cumsum([0, *(len(f.digests) // DIGEST_SIZE for f in seed.files)])[:-1]
        order = np.argsort(m.positions, kind="stable")
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
                written += _copy_range(src_fds[si], fds[fi], length, src_off, dst_off)
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


def _copy_range(src: int, dst: int, length: int, src_off: int, dst_off: int) -> int:
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
        if n == 0:
            raise OSError(f"seed file ended {length - done} bytes early")
        done += n
    return done


def pwritev_all(fd: int, buffers: list[Any], offset: int) -> int:
    """pwritev until every byte is written (a short write is legal, if rare on local files)."""
    total = sum(len(b) for b in buffers)
    done = os.pwritev(fd, buffers, offset)
    if done < total:  # finish the rest from one joined copy
        rest = b"".join(buffers)[done:]
        while rest:
            n = os.pwrite(fd, rest, offset + done)
            rest, done = rest[n:], done + n
    return total


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
        wanted = WantedChunks(manifest, verify=not repo.codec.authenticates)
        if seed is not None:
            copied = wanted.copy_from_seed(
                fds,
                repo.read_manifest(workload, seed[0]),
                seed[1],
                [f.size for f in manifest.files],
            )
            if progress:
                progress(copied)

        def fetch(pack_id: str) -> PackChunks | None:
            """Read and decompress (in a reader thread, off the GIL) what a pack holds
            for this checkpoint; the main thread verifies and writes it."""
            index = repo.index_for(pack_id, where)
            matches = wanted.find(index.digests)
            if not len(matches.entries):
                return None
            data = repo.pack_for(pack_id, where)
            return decompress_pack(pack_id, index, matches, data, where, wanted.sizes)

        with ThreadPoolExecutor(repo.concurrency, thread_name_prefix="pack-reader") as pool:
            # A window of `concurrency` packs in flight keeps memory bounded.
            packs = iter(manifest.packs)
            window = [pool.submit(fetch, p) for p in itertools.islice(packs, repo.concurrency)]
            while window:
                fetched = window.pop(0).result()
                nxt = next(packs, None)
                if nxt is not None:
                    window.append(pool.submit(fetch, nxt))
                if fetched is not None:
                    done = wanted.write(fds, fetched, where)
                    if progress:
                        progress(done)
        wanted.check_complete(where)
        for fd, entry in zip(fds, manifest.files, strict=True):
            os.fsync(fd)
            os.fchmod(fd, entry.mode & 0o700 or 0o600)
    finally:
        for fd in fds:
            os.close(fd)
        os.close(dir_fd)
    return manifest
