"""Byte ranges of one checkpointed file, read straight from its packs: a lazy restore's pages.

A full restore rebuilds every file before anything runs. A lazy one starts the tree first and
then needs pages one range at a time, in the order the tree touches them. Each range is
mapped to its chunks' digests (the manifest), each digest to its pack (the indexes of the
packs the manifest names), and each pack is fetched and opened once while it is in a small
cache: the background transfer walks a file in order, so consecutive ranges hit the same pack.

What is returned is verified as a full restore verifies it: a sealed pack's tag when it is
opened (it covers every chunk in it), or each chunk's hash in a repository in clear. A chunk
that fails is an error, never bytes: a lazy restore must kill the tree rather than let it run
on wrong memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import zstandard

from storage.chunk_index import digest_rows
from storage.errors import CorruptCheckpoint
from storage.manifest import DIGEST_SIZE, FileEntry, Manifest
from storage.packs import IndexArrays

if TYPE_CHECKING:
    from storage.repository import Repository

CACHED_PACKS = 8  # opened packs kept: 8 x 4 MiB of raw chunks at most
_LOCATE_RANGE = 256  # chunks: a read of at most this many of a file not located yet locates them


class CheckpointFiles:
    """Reads ranges of the files of one checkpoint. Safe to use from several threads."""

    def __init__(self, repo: Repository, workload: str, checkpoint_id: str) -> None:
        self.repo = repo
        self.manifest: Manifest = repo.read_manifest(workload, checkpoint_id)
        self.where = f"checkpoint {checkpoint_id} of {workload}"
        self.files: dict[str, FileEntry] = {f.name: f for f in self.manifest.files}
        # One after the other: read by 4 threads they took three times as long (1 GB: 250
        # indexes, 11 ms), the GIL passed back and forth.
        self._indexes: list[IndexArrays] = [
            repo.index_for(p, self.where) for p in self.manifest.packs
        ]
        rows, packs, entries = [], [], []
        for n, index in enumerate(self._indexes):
            count = len(index.offsets)
            rows.append(digest_rows(index.digests))
            packs.append(np.full(count, n, dtype=np.int32))
            entries.append(np.arange(count, dtype=np.int32))
        self._rows = np.concatenate(rows) if rows else np.empty((0, 4), dtype="<u8")
        self._pack_of = np.concatenate(packs) if packs else np.empty(0, dtype=np.int32)
        self._entry_of = np.concatenate(entries) if entries else np.empty(0, dtype=np.int32)
        self._order = np.argsort(self._rows[:, 0])
        self._keys = self._rows[self._order, 0]
        # Where every chunk of a file is, found once for the whole file when it is first
        # read, or ahead of that (`locate_ahead`), by a vectorised search: per-chunk lookups
        # in Python held the transfer to ~30 MB/s.
        self._where: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._locating = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._dctx = threading.local()
        self._frame_sizes: dict[int, np.ndarray] = {}  # pack number -> IndexArrays.frame_pages

    def locate_ahead(self, names: list[str]) -> None:
        """Find the chunks of these files in a thread of their own, so that the caller goes
        on meanwhile (a lazy restore starts CRIU while the pages' chunks are located: 30 ms
        of 1 GB); a read of one of them waits for it. A chunk in none of the packs is then
        the error of that read, as it would have been here."""

        def locate() -> None:
            for name in names:
                with contextlib.suppress(CorruptCheckpoint):  # raised again by the read
                    self._located(name)

        threading.Thread(target=locate, name="locate-chunks", daemon=True).start()

    def _located(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        with self._locating:
            where = self._where.get(name)
            if where is None:
                where = self._where[name] = self._locate_all(self._file(name))
            return where

    def size(self, name: str) -> int:
        return self._file(name).size

    def read(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes of file `name` from `offset` (clipped at its end), verified."""
        f = self._file(name)
        chunk = self.manifest.chunk_size
        end = min(offset + length, f.size)
        if offset < 0 or offset > end:
            raise ValueError(f"{name}: no bytes at {offset}")
        first, stop = offset // chunk, -(-end // chunk)
        if name not in self._where and stop - first <= _LOCATE_RANGE:
            # A few chunks of a file not located yet (the small images of a lazy restore,
            # while its pages are located meanwhile): just those, without waiting.
            packs, entries = self._locate_all(f, first, stop)
            base = first
        else:
            packs, entries = self._located(name)
            base = 0
        parts = []
        data: bytes = b""
        current = -1
        frame: tuple[tuple[int, int], bytes] = ((-1, -1), b"")  # the last one decoded
        for k in range(first, stop):
            pack_no = int(packs[k - base])
            if pack_no != current:
                data, current = self._pack(pack_no), pack_no
            piece, frame = self._chunk(f, k, pack_no, int(entries[k - base]), data, frame)
            parts.append(piece)
        out = b"".join(parts)
        skip = offset % chunk
        return out[skip : skip + end - offset]

    def _file(self, name: str) -> FileEntry:
        f = self.files.get(name)
        if f is None:
            raise CorruptCheckpoint(f"{self.where} has no file {name!r}")
        return f

    def _chunk(
        self,
        f: FileEntry,
        k: int,
        pack_no: int,
        entry: int,
        data: bytes,
        frame: tuple[tuple[int, int], bytes],
    ) -> tuple[bytes, tuple[tuple[int, int], bytes]]:
        """Chunk `k` of `f`, checked, and the frame decoded last (consecutive pages share
        one: each frame is decoded once per read, not once per page)."""
        chunk = self.manifest.chunk_size
        size = min(chunk, f.size - k * chunk)
        index = self._indexes[pack_no]
        start, stored = int(index.offsets[entry]), int(index.lengths[entry])
        if index.raw[entry]:
            out = bytes(data[start : start + stored])
        else:
            slot = int(index.slots[entry])
            if frame[0] != (pack_no, start):
                pages = int(self._frame_pages(pack_no)[entry])
                expected = size if pages == 1 else pages * chunk
                try:
                    decoded = self._decompressor().decompress(
                        data[start : start + stored], max_output_size=expected
                    )
                except zstandard.ZstdError as e:
                    raise self._bad(f"{f.name}: chunk {k} does not decompress ({e})") from e
                if len(decoded) != expected:
                    raise self._bad(f"{f.name}: chunk {k}'s frame is not {expected} bytes")
                frame = ((pack_no, start), decoded)
            out = frame[1][slot * chunk : slot * chunk + size]
        if len(out) != size or (
            not self.repo.codec.authenticates
            and self.repo.codec.chunk_id(out) != f.digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
        ):
            raise self._bad(f"{f.name}: chunk {k} does not match its digest")
        return out, frame

    def _frame_pages(self, pack_no: int) -> np.ndarray:
        pages = self._frame_sizes.get(pack_no)
        if pages is None:
            pages = self._frame_sizes[pack_no] = self._indexes[pack_no].frame_pages()
        return pages

    def _locate_all(
        self, f: FileEntry, first: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pack number, index entry) of each chunk of `f` (of chunks `first` to `stop`), in
        file order."""
        q = digest_rows(f.digests)[first:stop]
        n = len(q)
        packs = np.full(n, -1, dtype=np.int64)
        entries = np.full(n, -1, dtype=np.int64)
        if n and len(self._keys):
            # Searched in sorted order (each search then starts near the one before: twice as
            # fast on a 1 GB image's 256k chunks), the answers put back in file order.
            by_key = np.argsort(q[:, 0])
            lo = np.empty(n, dtype=np.int64)
            lo[by_key] = np.searchsorted(self._keys, q[by_key, 0], side="left")
            cand = self._order[np.minimum(lo, len(self._order) - 1)]
            hit = (lo < len(self._keys)) & (self._rows[cand] == q).all(axis=1)
            packs[hit], entries[hit] = self._pack_of[cand[hit]], self._entry_of[cand[hit]]
        for k in np.flatnonzero(packs < 0).tolist():  # first words shared, or not held at all
            digest = q[k].tobytes()
            packs[k], entries[k] = self._locate(digest)
        return packs, entries

    def _locate(self, digest: bytes) -> tuple[int, int]:
        row = digest_rows(digest)[0]
        lo = int(np.searchsorted(self._keys, row[0], side="left"))
        hi = int(np.searchsorted(self._keys, row[0], side="right"))
        for i in self._order[lo:hi]:
            if (self._rows[i] == row).all():
                return int(self._pack_of[i]), int(self._entry_of[i])
        raise self._bad(f"chunk {digest.hex()[:16]} is in none of its packs")

    def _pack(self, pack_no: int) -> bytes:
        with self._lock:
            data = self._cache.get(pack_no)
            if data is not None:
                self._cache.move_to_end(pack_no)
                return data
        # A copy: the codec opens packs into a buffer it reuses for the next one.
        data = bytes(self.repo.pack_for(self.manifest.packs[pack_no], self.where))
        with self._lock:
            self._cache[pack_no] = data
            while len(self._cache) > CACHED_PACKS:
                self._cache.popitem(last=False)
        return data

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._dctx, "d", None)
        if d is None:
            d = self._dctx.d = zstandard.ZstdDecompressor()
        return d

    def _bad(self, what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.where} is corrupt: {what}")
