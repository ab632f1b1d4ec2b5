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


class CheckpointFiles:
    """Reads ranges of the files of one checkpoint. Safe to use from several threads."""

    def __init__(self, repo: Repository, workload: str, checkpoint_id: str) -> None:
        self.repo = repo
        self.manifest: Manifest = repo.read_manifest(workload, checkpoint_id)
        self.where = f"checkpoint {checkpoint_id} of {workload}"
        self.files: dict[str, FileEntry] = {f.name: f for f in self.manifest.files}
        self._indexes: list[IndexArrays] = []
        rows, packs, entries = [], [], []
        for n, pack_id in enumerate(self.manifest.packs):
            index = repo.index_for(pack_id, self.where)
            self._indexes.append(index)
            count = len(index.offsets)
            rows.append(digest_rows(index.digests))
            packs.append(np.full(count, n, dtype=np.int32))
            entries.append(np.arange(count, dtype=np.int32))
        self._rows = np.concatenate(rows) if rows else np.empty((0, 4), dtype="<u8")
        self._pack_of = np.concatenate(packs) if packs else np.empty(0, dtype=np.int32)
        self._entry_of = np.concatenate(entries) if entries else np.empty(0, dtype=np.int32)
        self._order = np.argsort(self._rows[:, 0], kind="stable")
        self._keys = self._rows[self._order, 0]
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._dctx = threading.local()

    def size(self, name: str) -> int:
        return self._file(name).size

    def read(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes of file `name` from `offset` (clipped at its end), verified."""
        f = self._file(name)
        chunk = self.manifest.chunk_size
        end = min(offset + length, f.size)
        if offset < 0 or offset > end:
            raise ValueError(f"{name}: no bytes at {offset}")
        out = bytearray()
        for k in range(offset // chunk, -(-end // chunk)):
            out += self._chunk(f, k)
        skip = offset % chunk
        return bytes(out[skip : skip + end - offset])

    def _file(self, name: str) -> FileEntry:
        f = self.files.get(name)
        if f is None:
            raise CorruptCheckpoint(f"{self.where} has no file {name!r}")
        return f

    def _chunk(self, f: FileEntry, k: int) -> bytes:
        chunk = self.manifest.chunk_size
        digest = bytes(f.digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE])
        size = min(chunk, f.size - k * chunk)
        pack_no, entry = self._locate(digest)
        index = self._indexes[pack_no]
        data = self._pack(pack_no)
        start, stored = int(index.offsets[entry]), int(index.lengths[entry])
        piece = data[start : start + stored]
        raw = getattr(index, "raw", None)  # indexes written before raw chunks have none
        if raw is not None and raw[entry]:
            out = bytes(piece)
        else:
            try:
                out = self._decompressor().decompress(piece, max_output_size=size)
            except zstandard.ZstdError as e:
                raise self._bad(f"{f.name}: chunk {k} does not decompress ({e})") from e
        if len(out) != size or (
            not self.repo.codec.authenticates and self.repo.codec.chunk_id(out) != digest
        ):
            raise self._bad(f"{f.name}: chunk {k} does not match its digest")
        return out

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
