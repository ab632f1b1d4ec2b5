"""Rebuilding image files from packs: where each chunk of a checkpoint goes, and putting it there.

A 1 GB image is 262,144 chunks. Mapping each digest to its places with Python objects cost
~60 MB and most of a restore's time, so the manifest's digests are sorted once and a whole
pack's index is matched against them in one vectorised search. Decompression runs in the
reader threads (zstd releases the GIL); the caller's thread verifies every chunk's BLAKE3 and
writes runs of consecutive pages with one pwritev each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt
import zstandard

from storage.chunk_index import digest_rows
from storage.errors import CorruptCheckpoint
from storage.manifest import DIGEST_SIZE, Manifest
from storage.packs import IndexArrays

_IOV_MAX = 1024  # buffers per pwritev (Linux's IOV_MAX)


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
    pack_id: str, index: IndexArrays, m: Matches, data: bytes, where: str
) -> PackChunks:
    corrupt = f"{where} is corrupt: pack {pack_id}"
    needed = np.unique(m.entries)
    segments = np.empty((len(needed), 2), dtype="<u8")
    segments[:, 0] = index.offsets[needed]
    segments[:, 1] = index.lengths[needed]
    if int((segments[:, 0] + segments[:, 1]).max()) > len(data):
        raise CorruptCheckpoint(f"{corrupt} is truncated")
    try:
        chunks = zstandard.ZstdDecompressor().multi_decompress_to_buffer(
            zstandard.BufferWithSegments(data, segments.tobytes()), threads=1
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

    def __init__(self, manifest: Manifest) -> None:
        self.chunk_size = manifest.chunk_size
        self.rows = digest_rows(b"".join(f.digests for f in manifest.files))
        counts = [len(f.digests) // DIGEST_SIZE for f in manifest.files]
        self.file_starts = np.cumsum([0, *counts])[:-1]
        self.order = np.argsort(self.rows[:, 0], kind="stable")
        self.keys = self.rows[self.order, 0]
        self.done = np.zeros(len(self.rows), dtype=bool)

    def find(self, pack_digests: bytes) -> Matches:
        q = digest_rows(pack_digests)
        lo = np.searchsorted(self.keys, q[:, 0], side="left")
        hi = np.searchsorted(self.keys, q[:, 0], side="right")
        counts = hi - lo
        total = int(counts.sum())
        entries = np.repeat(np.arange(len(q)), counts)
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        positions = self.order[np.arange(total) + starts]
        full = (self.rows[positions] == q[entries]).all(axis=1)
        return Matches(entries[full], positions[full])

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
        for k in np.unique(slot).tolist():
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

    def check_complete(self, where: str) -> None:
        if not self.done.all():
            first = int(np.flatnonzero(~self.done)[0])
            raise CorruptCheckpoint(
                f"{where} is incomplete: {int((~self.done).sum())} chunk(s) (first "
                f"{self.rows[first].tobytes().hex()[:16]}) are in none of its packs; restore "
                "an older checkpoint"
            )


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
