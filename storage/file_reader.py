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

import numpy as np
import zstandard

from storage.chunk_index import AllIndexes, ChunkIndex, digest_rows
from storage.crypto import SEGMENTED_HEADER, PackLayout
from storage.errors import BlobNotFound, CorruptCheckpoint
from storage.keys import pack_key
from storage.manifest import DIGEST_SIZE, FileEntry, Manifest
from storage.pack_reading import PackReader
from storage.packs import IndexArrays

CACHED_PACKS = 8  # packs sealed whole (format 1) kept opened: 8 x 4 MiB at most
CACHED_SEGMENTS = 512  # opened 64 KiB segments kept: 32 MiB at most
_LOCATE_RANGE = 256  # chunks: a read of at most this many of a file not located yet locates them


class CheckpointFiles:
    """Reads ranges of the files of one checkpoint. Safe to use from several threads."""

    def __init__(
        self,
        repo: PackReader,
        workload: str,
        checkpoint_id: str,
        hints: ChunkIndex | None = None,
    ) -> None:
        """`repo`: the repository, or any PackReader (storage/pack_reading.py).
        `hints`: the repository's chunk index, if this process holds one (a daemon that
        has committed): it says which pack holds a chunk, so a few chunks are located by
        reading their packs' indexes alone. Without it, or where it does not know a chunk
        (or names a pack this checkpoint does not use), every index of the checkpoint is
        read once and searched together, as for a whole file."""
        self.repo = repo
        self.manifest: Manifest = repo.read_manifest(workload, checkpoint_id)
        self.where = f"checkpoint {checkpoint_id} of {workload}"
        self.home = self.manifest.pack_home  # where its packs live, as it says
        self.files: dict[str, FileEntry] = {f.name: f for f in self.manifest.files}
        self._hints = hints
        self._pack_no = {pack: n for n, pack in enumerate(self.manifest.packs)}
        self._indexes: dict[int, IndexArrays] = {}
        self._by_digest: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._all: AllIndexes | None = None
        self._reading_all = threading.Lock()
        # Where every chunk of a file is, found once for the whole file when it is first
        # read, or ahead of that (`locate_ahead`), by a vectorised search: per-chunk lookups
        # in Python held the transfer to ~30 MB/s.
        self._where: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._locating = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._segments: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._layouts: dict[int, PackLayout | None] = {}
        self._lock = threading.Lock()
        self._dctx = threading.local()
        self._frame_sizes: dict[int, np.ndarray] = {}  # pack number -> IndexArrays.frame_pages
        if hints is None:
            self._every_index()  # errors of a missing or damaged index here, as before

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
        packs, entries = packs[first - base : stop - base], entries[first - base : stop - base]
        self._read_ahead(packs, entries)
        if self.repo.codec.authenticates:
            out = self._runs(f, first, packs, entries)
        else:  # in clear, each chunk is hashed again on its own
            parts, frame = [], ((-1, -1), b"")  # the last frame decoded
            rows = zip(packs.tolist(), entries.tolist(), strict=True)
            for k, (pack_no, entry) in enumerate(rows, first):
                piece, frame = self._chunk(f, k, pack_no, entry, frame)
                parts.append(piece)
            out = b"".join(parts)
        skip = offset % chunk
        return out[skip : skip + end - offset]

    def _file(self, name: str) -> FileEntry:
        f = self.files.get(name)
        if f is None:
            raise CorruptCheckpoint(f"{self.where} has no file {name!r}")
        return f

    def _runs(self, f: FileEntry, first: int, packs: np.ndarray, entries: np.ndarray) -> bytes:
        """Chunks `first` on of `f`, a run at a time (the consecutive chunks of one frame, or
        contiguous raw ones, sliced at once; lengths checked as `_chunk` does), where the codec
        authenticates (the pack's tag covers every chunk). A chunk at a time, Python's loop was
        most of a lazy transfer: 4.0 -> 1.6 s a GB (4.4 -> 1.9 with every third page deduped)."""
        chunk = self.manifest.chunk_size
        n = len(packs)
        if not n:  # an empty file, or a read at its end: no chunk, no run
            return b""
        offs, lens, slots, fpages = (np.empty(n, dtype=np.int64) for _ in range(4))
        raw = np.empty(n, dtype=bool)
        for pack_no in np.unique(packs).tolist():  # a few packs: deduped chunks interleave
            sel = np.flatnonzero(packs == pack_no)
            index, e = self._index(pack_no), entries[sel]
            offs[sel], lens[sel], raw[sel] = index.offsets[e], index.lengths[e], index.raw[e]
            slots[sel], fpages[sel] = index.slots[e], self._frame_pages(pack_no)[e]
        same = packs[1:] == packs[:-1]
        framed = same & ~raw[1:] & ~raw[:-1] & (offs[1:] == offs[:-1])
        framed &= slots[1:] == slots[:-1] + 1
        contiguous = same & raw[1:] & raw[:-1] & (offs[1:] == offs[:-1] + lens[:-1])
        contiguous &= lens[:-1] == chunk
        breaks = (np.flatnonzero(~(framed | contiguous)) + 1).tolist()
        pk, of, ln, rw = packs.tolist(), offs.tolist(), lens.tolist(), raw.tolist()
        sl, fp = slots.tolist(), fpages.tolist()
        parts: list[bytes] = []
        frames: dict[tuple[int, int], bytes] = {}  # decoded in this read (dedup revisits)
        for c, d in zip([0, *breaks], [*breaks, n], strict=True):
            k = first + c  # the run's first chunk in the file
            size = min((d - c) * chunk, f.size - k * chunk)  # the file's last may be short
            pack_no, start = pk[c], of[c]
            if rw[c]:
                piece = self._stored(pack_no, start, of[d - 1] + ln[d - 1] - start)
            else:
                decoded = frames.get((pack_no, start))
                if decoded is None:
                    expected = size if fp[c] == 1 else fp[c] * chunk
                    try:
                        decoded = self._decompressor().decompress(
                            self._stored(pack_no, start, ln[c]), max_output_size=expected
                        )
                    except zstandard.ZstdError as err:
                        raise self._bad(f"{f.name}: chunk {k} does not decompress ({err})") from err
                    if len(decoded) != expected:
                        raise self._bad(f"{f.name}: chunk {k}'s frame is not {expected} bytes")
                    if len(frames) >= 64:
                        frames.clear()
                    frames[(pack_no, start)] = decoded
                piece = decoded[sl[c] * chunk : sl[c] * chunk + size]
            if len(piece) != size:
                raise self._bad(f"{f.name}: chunks {k} to {k + d - c - 1} are not {size} bytes")
            parts.append(piece)
        return b"".join(parts)

    def _chunk(
        self,
        f: FileEntry,
        k: int,
        pack_no: int,
        entry: int,
        frame: tuple[tuple[int, int], bytes],
    ) -> tuple[bytes, tuple[tuple[int, int], bytes]]:
        """Chunk `k` of `f`, checked, and the frame decoded last (consecutive pages share
        one: each frame is decoded once per read, not once per page)."""
        chunk = self.manifest.chunk_size
        size = min(chunk, f.size - k * chunk)
        index = self._index(pack_no)
        start, stored = int(index.offsets[entry]), int(index.lengths[entry])
        if index.raw[entry]:
            out = self._stored(pack_no, start, stored)
        else:
            slot = int(index.slots[entry])
            if frame[0] != (pack_no, start):
                pages = int(self._frame_pages(pack_no)[entry])
                expected = size if pages == 1 else pages * chunk
                try:
                    decoded = self._decompressor().decompress(
                        self._stored(pack_no, start, stored), max_output_size=expected
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
            pages = self._frame_sizes[pack_no] = self._index(pack_no).frame_pages()
        return pages

    def _locate_all(
        self, f: FileEntry, first: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pack number, index entry) of each chunk of `f` (of chunks `first` to `stop`), in
        file order."""
        q = digest_rows(f.digests)[first:stop]
        if self._all is None and self._hints is not None and len(q) <= _LOCATE_RANGE:
            end = len(q) + first
            hinted = self._locate_hinted(f.digests[first * DIGEST_SIZE : end * DIGEST_SIZE], q)
            if hinted is not None:
                return hinted
        every = self._every_index()
        n = len(q)
        packs = np.full(n, -1, dtype=np.int64)
        entries = np.full(n, -1, dtype=np.int64)
        if n and len(every.keys):
            # Searched in sorted order (each search then starts near the one before: twice as
            # fast on a 1 GB image's 256k chunks), the answers put back in file order.
            by_key = np.argsort(q[:, 0])
            lo = np.empty(n, dtype=np.int64)
            lo[by_key] = np.searchsorted(every.keys, q[by_key, 0], side="left")
            cand = every.order[np.minimum(lo, len(every.order) - 1)]
            hit = (lo < len(every.keys)) & (every.rows[cand] == q).all(axis=1)
            packs[hit], entries[hit] = every.pack_of[cand[hit]], every.entry_of[cand[hit]]
        for k in np.flatnonzero(packs < 0).tolist():  # first words shared, or not held at all
            digest = q[k].tobytes()
            packs[k], entries[k] = self._locate(every, digest)
        return packs, entries

    def _locate_hinted(
        self, digests: bytes | bytearray, q: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The chunks located through the hints and their packs' indexes, or None if any
        one is not found that way. A wrong hint costs a search, never a wrong chunk: the
        entry is the one whose digest is the chunk's, in a pack of this checkpoint."""
        assert self._hints is not None
        numbers = self._hints.lookup(digests)
        if (numbers < 0).any():
            return None
        packs = np.empty(len(q), dtype=np.int64)
        entries = np.empty(len(q), dtype=np.int64)
        for number in np.unique(numbers).tolist():
            pack_no = self._pack_no.get(self._hints.pack_id(number))
            if pack_no is None:
                return None
            sel = np.flatnonzero(numbers == number)
            order, keys, rows = self._sorted_index(pack_no)
            if not len(keys):
                return None
            lo = np.minimum(np.searchsorted(keys, q[sel, 0]), len(keys) - 1)
            cand = order[lo]
            if not (rows[cand] == q[sel]).all():
                return None  # not there, or two digests sharing a first word: the slow way
            packs[sel], entries[sel] = pack_no, cand
        return packs, entries

    def _index(self, pack_no: int) -> IndexArrays:
        index = self._indexes.get(pack_no)
        if index is None:
            index = self._indexes.setdefault(
                pack_no,
                self.repo.index_for(self.manifest.packs[pack_no], self.home, self.where),
            )
        return index

    def _sorted_index(self, pack_no: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pack's index sorted by digest: (order, first words sorted, rows)."""
        found = self._by_digest.get(pack_no)
        if found is None:
            rows = digest_rows(self._index(pack_no).digests)
            order = np.argsort(rows[:, 0])
            found = self._by_digest[pack_no] = (order, rows[order, 0], rows)
        return found

    def _every_index(self) -> AllIndexes:
        """Every index of the checkpoint, read once and searchable together."""
        with self._reading_all:
            if self._all is None:
                # One after the other: read by 4 threads they took three times as long (1 GB:
                # 250 indexes, 11 ms), the GIL passed back and forth.
                indexes = [self._index(n) for n in range(len(self.manifest.packs))]
                self._all = AllIndexes(indexes)
            return self._all

    def _locate(self, every: AllIndexes, digest: bytes) -> tuple[int, int]:
        row = digest_rows(digest)[0]
        lo = int(np.searchsorted(every.keys, row[0], side="left"))
        hi = int(np.searchsorted(every.keys, row[0], side="right"))
        for i in every.order[lo:hi]:
            if (every.rows[i] == row).all():
                return int(every.pack_of[i]), int(every.entry_of[i])
        raise self._bad(f"chunk {digest.hex()[:16]} is in none of its packs")

    def _read_ahead(self, packs: np.ndarray, entries: np.ndarray) -> None:
        """Fetch, for each pack a read touches, the span of its segments that read needs,
        in one request: a bucket then sees one GET per pack and read, not one per segment."""
        for pack_no in np.unique(packs).tolist():
            index = self._index(pack_no)
            mine = entries[packs == pack_no]
            starts = index.offsets[mine].astype(np.int64)
            lo, hi = int(starts.min()), int((starts + index.lengths[mine]).max())
            self._stored(pack_no, lo, hi - lo, keep_only=True)

    def _stored(self, pack_no: int, start: int, length: int, keep_only: bool = False) -> bytes:
        """Bytes `start` to `start + length` of a pack as its index counts them (opened),
        read and verified a segment at a time (crypto.py), the segments kept a while
        (`keep_only`: only that, nothing returned)."""
        key = pack_key(self.manifest.packs[pack_no], self.home)
        layout = self._layout(pack_no, key)
        if layout is None:  # sealed whole (format 1): opened whole
            data = self._whole(pack_no)
            if keep_only:
                return b""
            if start + length > len(data):
                raise self._bad(f"pack {self.manifest.packs[pack_no]} is shorter than its index")
            return data[start : start + length]
        if length <= 0:
            return b""
        if start < 0 or start + length > layout.size:
            raise self._bad(f"pack {self.manifest.packs[pack_no]} is shorter than its index")
        first, last = start // layout.segment, (start + length - 1) // layout.segment
        with self._lock:
            have = {i: self._segments.get((pack_no, i)) for i in range(first, last + 1)}
            for i, seg in have.items():
                if seg is not None:
                    self._segments.move_to_end((pack_no, i))
        missing = [i for i, seg in have.items() if seg is None]
        if missing:
            have.update(self._fetch(pack_no, key, layout, missing[0], missing[-1]))
        if keep_only:
            return b""
        data = b"".join(seg for seg in have.values() if seg is not None)  # in segment order
        at = start - first * layout.segment
        return data[at : at + length]

    def _fetch(
        self, pack_no: int, key: str, layout: PackLayout, lo: int, hi: int
    ) -> dict[int, bytes]:
        """Segments `lo` to `hi` of a pack, in one read, opened, and kept."""
        at = layout.span(lo)[0]
        end = sum(layout.span(hi))
        try:
            stored, _ = self.repo.pack_range(self.manifest.packs[pack_no], self.home, at, end - at)
        except BlobNotFound as e:
            raise self._bad(f"pack {self.manifest.packs[pack_no]} is missing") from e
        if len(stored) != end - at:
            raise self._bad(f"pack {self.manifest.packs[pack_no]} is truncated")
        out: dict[int, bytes] = {}
        for i in range(lo, hi + 1):
            offset, length = layout.span(i)
            try:
                out[i] = self.repo.codec.open_segment(
                    key, layout, i, stored[offset - at : offset - at + length]
                )
            except CorruptCheckpoint as e:
                raise self._bad(str(e)) from e
        with self._lock:
            for i, seg in out.items():
                self._segments[(pack_no, i)] = seg
            while len(self._segments) > CACHED_SEGMENTS:
                self._segments.popitem(last=False)
        return out

    def _layout(self, pack_no: int, key: str) -> PackLayout | None:
        if pack_no in self._layouts:
            return self._layouts[pack_no]
        try:
            head, size = self.repo.pack_range(
                self.manifest.packs[pack_no], self.home, 0, SEGMENTED_HEADER
            )
        except BlobNotFound as e:
            raise self._bad(f"pack {self.manifest.packs[pack_no]} is missing") from e
        try:
            layout = self.repo.codec.pack_layout(key, head, size)
        except CorruptCheckpoint as e:
            raise self._bad(str(e)) from e
        self._layouts[pack_no] = layout
        return layout

    def _whole(self, pack_no: int) -> bytes:
        with self._lock:
            data = self._cache.get(pack_no)
            if data is not None:
                self._cache.move_to_end(pack_no)
                return data
        # A copy: the codec opens packs into a buffer it reuses for the next one.
        data = bytes(self.repo.pack_for(self.manifest.packs[pack_no], self.home, self.where))
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
