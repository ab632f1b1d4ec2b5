"""Which pack holds each chunk: the repository's deduplication index, kept compact.

A 1 GB image is 262,144 chunks. A dict of 32-byte digests costs about 130 bytes a chunk (a
bytes object and a hash-table slot each), so the index of a few GB of images alone would
exceed the daemon's memory budget. Here a chunk costs 44 bytes: its digest as four 64-bit
words in one sorted numpy array, its first word again as the search key, and a 32-bit pack
number. A block of digests is looked up in one vectorised binary search.

Additions go to a small dict first and are merged into the sorted arrays in batches, so adding
one pack does not re-sort everything.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

from storage.manifest import DIGEST_SIZE

_WORDS = DIGEST_SIZE // 8
_MERGE_AT = 1 << 14  # recent additions merged into the sorted arrays past this many

Rows = npt.NDArray[np.uint64]


def digest_rows(digests: bytes | bytearray | memoryview) -> Rows:
    """Concatenated 32-byte digests as an (n, 4) array of words, without copying."""
    return np.frombuffer(digests, dtype="<u8").reshape(-1, _WORDS)


class ChunkIndex:
    """digest -> pack id for every chunk of the packs added. Safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pack_ids: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._rows: Rows = np.empty((0, _WORDS), dtype="<u8")  # sorted by first word
        self._keys: Rows = np.empty(0, dtype="<u8")  # first word of each row, contiguous
        self._packs: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys) + len(self._recent)

    def pack_id(self, number: int) -> str:
        return self._pack_ids[number]

    def add(self, pack_id: str, digests: bytes | bytearray | memoryview) -> None:
        """Record that pack `pack_id` holds the chunks with these concatenated digests."""
        raw = bytes(digests)
        with self._lock:
            number = self._number(pack_id)
            held = self._find_sorted(digest_rows(raw))
            for i in np.flatnonzero(held < 0).tolist():
                self._recent.setdefault(raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE], number)
            if len(self._recent) >= _MERGE_AT:
                self._merge()

    def add_many(self, packs: Iterable[tuple[str, bytes]]) -> None:
        """Bulk load (pack id, digests) pairs: one sort at the end instead of merges."""
        rows: list[Rows] = []
        numbers: list[npt.NDArray[np.uint32]] = []
        with self._lock:
            for pack_id, digests in packs:
                r = digest_rows(digests)
                rows.append(r)
                numbers.append(np.full(len(r), self._number(pack_id), dtype=np.uint32))
            if rows:
                self._insert(np.concatenate(rows), np.concatenate(numbers))

    def lookup(self, digests: bytes | bytearray | memoryview) -> npt.NDArray[np.int64]:
        """Pack number of each digest (see `pack_id`), or -1 for chunks not held."""
        with self._lock:
            out = self._find_sorted(digest_rows(digests))
            if self._recent:
                raw = bytes(digests)
                for i in np.flatnonzero(out < 0).tolist():
                    out[i] = self._recent.get(raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE], -1)
            return out

    def forget(self, pack_ids: set[str]) -> None:
        """Drop the chunks of deleted packs: they can no longer be referenced."""
        with self._lock:
            gone = [self._pack_no[p] for p in pack_ids if p in self._pack_no]
            if not gone:
                return
            keep = ~np.isin(self._packs, gone)
            self._rows, self._keys, self._packs = (
                self._rows[keep],
                self._keys[keep],
                self._packs[keep],
            )
            gone_set = set(gone)
            self._recent = {d: n for d, n in self._recent.items() if n not in gone_set}

    def merge_into(self, other: ChunkIndex, keep: Callable[[str], bool]) -> None:
        """Add to `other` the chunks it lacks from this index, of the packs `keep` accepts (a
        refresh built from a listing keeps what commits added while it listed, and only that:
        a pack not listed any more was deleted)."""
        with self._lock:
            self._merge()
            rows, packs, ids = self._rows, self._packs, list(self._pack_ids)
        kept = np.array([keep(i) for i in ids], dtype=bool)
        if len(rows) and len(ids):
            sel = kept[packs]
            rows, packs = rows[sel], packs[sel]
        with other._lock:
            remap = np.array([other._number(i) for i in ids], dtype=np.uint32)
            if len(rows):
                other._insert(rows, remap[packs])

    # -- internals, called with the lock held ------------------------------------------

    def _number(self, pack_id: str) -> int:
        number = self._pack_no.get(pack_id)
        if number is None:
            number = self._pack_no[pack_id] = len(self._pack_ids)
            self._pack_ids.append(pack_id)
        return number

    def _find_sorted(self, q: Rows) -> npt.NDArray[np.int64]:
        """Pack numbers of rows `q` in the sorted arrays, -1 where absent."""
        out = np.full(len(q), -1, dtype=np.int64)
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, q[:, 0]), len(self._keys) - 1)
            hit = (self._rows[pos] == q).all(axis=1)
            out[hit] = self._packs[pos[hit]]
            # Two digests sharing their first 64 bits: check the run one by one (rare).
            for i in np.flatnonzero(~hit & (self._keys[pos] == q[:, 0])).tolist():
                out[i] = self._scan(int(pos[i]), q[i])
        return out

    def _merge(self) -> None:
        if not self._recent:
            return
        raw = b"".join(self._recent)
        numbers = np.fromiter(self._recent.values(), dtype=np.uint32, count=len(self._recent))
        self._recent = {}
        self._insert(digest_rows(raw), numbers)

    def _insert(self, rows: Rows, numbers: npt.NDArray[np.uint32]) -> None:
        """Insert rows not held yet, keeping the arrays sorted (a merge, not a full sort)."""
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, rows[:, 0]), len(self._keys) - 1)
            new = ~(self._rows[pos] == rows).all(axis=1)
            rows, numbers = rows[new], numbers[new]
        order = np.argsort(rows[:, 0], kind="stable")
        rows, numbers = rows[order], numbers[order]
        if len(rows) > 1:  # the same chunk added twice (two packs hold it): keep the first
            dup = np.zeros(len(rows), dtype=bool)
            dup[1:] = (rows[1:] == rows[:-1]).all(axis=1)
            if dup.any():
                rows, numbers = rows[~dup], numbers[~dup]
        at = np.searchsorted(self._keys, rows[:, 0])
        self._rows = np.insert(self._rows, at, rows, axis=0)
        self._keys = np.insert(self._keys, at, rows[:, 0])
        self._packs = np.insert(self._packs, at, numbers)

    def _scan(self, pos: int, row: Rows) -> int:
        key = self._keys[pos]
        for p in range(pos, len(self._keys)):
            if self._keys[p] != key:
                break
            if (self._rows[p] == row).all():
                return int(self._packs[p])
        return -1
