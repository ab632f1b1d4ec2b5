"""Which pack holds each chunk: the repository's deduplication index, kept compact.

A 1 GB image is 262,144 chunks. A dict of 32-byte digests costs about 130 bytes a chunk (a
bytes object and a hash-table slot each), so the index of a few GB of images alone would
exceed the daemon's memory budget. Here a chunk costs 20 bytes: the first 128 bits of its
digest as two 64-bit words in two sorted numpy arrays (the first is the search key) and a
32-bit pack number. A block of digests is looked up in one vectorised binary search.

128 bits decide, not 256: two different chunks of one repository sharing them would take
2^64 chunks to meet by chance, and to craft on purpose a birthday attack on BLAKE3 (its keyed
form in an encrypted repository, whose key an attacker lacks). Were it to happen anyway, the
pack's own index would not list the chunk's full digest and its restore would refuse the
checkpoint rather than return the other chunk. At 4 GB of distinct pages this is 20 MB, where
the whole digests cost 44 MB, and twice that while a merge holds old and new arrays.

Additions go to a small dict first and are merged into the sorted arrays in batches, so adding
one pack does not re-sort everything.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

from storage.manifest import DIGEST_SIZE
from storage.packs import IndexArrays

_WORDS = DIGEST_SIZE // 8
_KEY_BYTES = 16  # the part of a digest the index keeps and compares
_KEYED = np.dtype([("key", f"V{_KEY_BYTES}"), ("rest", f"V{DIGEST_SIZE - _KEY_BYTES}")])
_MERGE_AT = 1 << 14  # recent additions merged into the sorted arrays past this many

Rows = npt.NDArray[np.uint64]
Words = npt.NDArray[np.uint64]


def digest_rows(digests: bytes | bytearray | memoryview) -> Rows:
    """Concatenated 32-byte digests as an (n, 4) array of words, without copying."""
    return np.frombuffer(digests, dtype="<u8").reshape(-1, _WORDS)


def _key_words(digests: bytes | bytearray | memoryview) -> tuple[Words, Words]:
    """The two words the index keeps of each digest, each contiguous."""
    rows = digest_rows(digests)
    return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1])


class ChunkIndex:
    """digest -> pack id for every chunk of the packs added. Safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pack_ids: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._keys: Words = np.empty(0, dtype="<u8")  # first word, sorted
        self._seconds: Words = np.empty(0, dtype="<u8")  # second word, in the same order
        self._packs: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self._recent: dict[bytes, int] = {}  # first _KEY_BYTES of the digest -> pack number

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
            held = self._find_sorted(*_key_words(raw))
            keys = np.frombuffer(raw, dtype=_KEYED)["key"][held < 0].tolist()
            collections.deque(map(self._recent.setdefault, keys, itertools.repeat(number)), 0)
            if len(self._recent) >= _MERGE_AT:
                self._merge()

    def add_many(self, packs: Iterable[tuple[str, bytes]]) -> None:
        """Bulk load (pack id, digests) pairs: one sort at the end instead of merges."""
        firsts: list[Words] = []
        seconds: list[Words] = []
        numbers: list[npt.NDArray[np.uint32]] = []
        with self._lock:
            for pack_id, digests in packs:
                k, s = _key_words(digests)
                firsts.append(k)
                seconds.append(s)
                numbers.append(np.full(len(k), self._number(pack_id), dtype=np.uint32))
            if firsts:
                self._insert(
                    np.concatenate(firsts), np.concatenate(seconds), np.concatenate(numbers)
                )

    def lookup(self, digests: bytes | bytearray | memoryview) -> npt.NDArray[np.int64]:
        """Pack number of each digest (see `pack_id`), or -1 for chunks not held."""
        with self._lock:
            out = self._find_sorted(*_key_words(digests))
            if self._recent:
                missing = np.flatnonzero(out < 0)
                keys = np.frombuffer(digests, dtype=_KEYED)["key"][missing].tolist()
                out[missing] = list(map(self._recent.get, keys, itertools.repeat(-1)))
            return out

    def forget(self, pack_ids: set[str]) -> None:
        """Drop the chunks of deleted packs: they can no longer be referenced."""
        with self._lock:
            gone = [self._pack_no[p] for p in pack_ids if p in self._pack_no]
            if not gone:
                return
            keep = ~np.isin(self._packs, gone)
            self._keys, self._seconds, self._packs = (
                self._keys[keep],
                self._seconds[keep],
                self._packs[keep],
            )
            gone_set = set(gone)
            self._recent = {d: n for d, n in self._recent.items() if n not in gone_set}

    def held_packs(self) -> set[str]:
        """The packs at least one chunk of which this index holds."""
        with self._lock:
            numbers = set(np.unique(self._packs).tolist()) | set(self._recent.values())
            return {self._pack_ids[n] for n in numbers}

    def merge_into(self, other: ChunkIndex, keep: Callable[[str], bool]) -> None:
        """Add to `other` the chunks it lacks from this index, of the packs `keep` accepts (a
        refresh built from a listing keeps what commits added while it listed, and only that:
        a pack not listed any more was deleted)."""
        with self._lock:
            self._merge()
            keys, seconds, packs = self._keys, self._seconds, self._packs
            ids = list(self._pack_ids)
        kept = np.array([keep(i) for i in ids], dtype=bool)
        if len(keys) and len(ids):
            sel = kept[packs]
            keys, seconds, packs = keys[sel], seconds[sel], packs[sel]
        with other._lock:
            remap = np.array([other._number(i) for i in ids], dtype=np.uint32)
            if len(keys):
                other._insert(keys, seconds, remap[packs])

    # -- internals, called with the lock held ------------------------------------------

    def _number(self, pack_id: str) -> int:
        number = self._pack_no.get(pack_id)
        if number is None:
            number = self._pack_no[pack_id] = len(self._pack_ids)
            self._pack_ids.append(pack_id)
        return number

    def _find_sorted(self, k: Words, s: Words) -> npt.NDArray[np.int64]:
        """Pack numbers of the keys (`k`, `s`) in the sorted arrays, -1 where absent."""
        out = np.full(len(k), -1, dtype=np.int64)
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, k), len(self._keys) - 1)
            first = self._keys[pos] == k
            hit = first & (self._seconds[pos] == s)
            out[hit] = self._packs[pos[hit]]
            # Two digests sharing their first 64 bits: check the run one by one (rare).
            for i in np.flatnonzero(first & ~hit).tolist():
                out[i] = self._scan(int(pos[i]), k[i], s[i])
        return out

    def _merge(self) -> None:
        if not self._recent:
            return
        raw = b"".join(self._recent)
        numbers = np.fromiter(self._recent.values(), dtype=np.uint32, count=len(self._recent))
        self._recent = {}
        rows = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
        self._insert(np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1]), numbers)

    def _insert(self, k: Words, s: Words, numbers: npt.NDArray[np.uint32]) -> None:
        """Insert keys not held yet, keeping the arrays sorted (a merge, not a full sort)."""
        if len(self._keys):
            new = self._find_sorted(k, s) < 0
            k, s, numbers = k[new], s[new], numbers[new]
        order = np.lexsort((s, k))  # by first word, then second: duplicates adjacent
        k, s, numbers = k[order], s[order], numbers[order]
        if len(k) > 1:  # the same chunk added twice (two packs hold it): keep the first
            dup = np.zeros(len(k), dtype=bool)
            dup[1:] = (k[1:] == k[:-1]) & (s[1:] == s[:-1])
            if dup.any():
                k, s, numbers = k[~dup], s[~dup], numbers[~dup]
        at = np.searchsorted(self._keys, k)
        self._keys = np.insert(self._keys, at, k)
        self._seconds = np.insert(self._seconds, at, s)
        self._packs = np.insert(self._packs, at, numbers)

    def _scan(self, pos: int, k: np.uint64, s: np.uint64) -> int:
        for p in range(pos, len(self._keys)):
            if self._keys[p] != k:
                break
            if self._seconds[p] == s:
                return int(self._packs[p])
        return -1


class AllIndexes:
    """The entries of every index of a checkpoint, sorted by their digests' first words."""

    def __init__(self, indexes: list[IndexArrays]) -> None:
        rows, packs, entries = [], [], []
        for n, index in enumerate(indexes):
            count = len(index.offsets)
            rows.append(digest_rows(index.digests))
            packs.append(np.full(count, n, dtype=np.int32))
            entries.append(np.arange(count, dtype=np.int32))
        self.rows = np.concatenate(rows) if rows else np.empty((0, 4), dtype="<u8")
        self.pack_of = np.concatenate(packs) if packs else np.empty(0, dtype=np.int32)
        self.entry_of = np.concatenate(entries) if entries else np.empty(0, dtype=np.int32)
        self.order = np.argsort(self.rows[:, 0])
        self.keys = self.rows[self.order, 0]
