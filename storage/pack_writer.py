"""The new chunks of one commit, packed and stored by writer threads while the next pack fills.

Two packs in flight (compressing or being stored) and one filling, with their buffers reused:
memory stays at three 4 MiB buffers plus their compressed copies, whatever the image size.
A chunk seen twice in one commit (zero pages) goes into one pack: `pending` answers for chunks
whose pack is not stored yet; once stored, the ChunkIndex does. Packs are stored under the
prefix of the workload being committed (storage/keys.py): they belong to it.
"""

from __future__ import annotations

import collections
import itertools
import operator
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.clock import SYSTEM, Clock
from storage.crypto import Codec
from storage.keys import index_key, pack_key
from storage.manifest import DIGEST_SIZE
from storage.packs import PackBuilder, Piece

# Sealed and written this much at a time: below malloc's mmap threshold, so each sealed
# slice reuses heap memory instead of faulting in a fresh mapping.
_SEAL_STEP = 128 * 1024
_DIGEST = np.dtype(f"V{DIGEST_SIZE}")  # a digest as one numpy item: tolist() gives bytes


class PackWriter:
    def __init__(
        self,
        backend: BlobStore,
        codec: Codec,
        index: ChunkIndex,
        home: str,
        in_flight: int = 2,
        level: int = 1,
        clock: Clock = SYSTEM,
    ) -> None:
        """`home`: the workload whose prefix the packs go under; `clock` names the packs."""
        self.clock = clock
        self.backend = backend
        self.home = home
        self.codec = codec
        self.index = index
        self.level = level
        self.in_flight_max = in_flight
        self.new_bytes = 0  # compressed bytes stored
        self.new_chunks = 0
        self._spare: list[bytearray] = []
        self._builder = PackBuilder(self._spare, clock.wall())
        self._pending: dict[bytes, str] = {}
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="pack-writer")
        self._in_flight: list[tuple[Future[int], PackBuilder]] = []
        self._stored: list[PackBuilder] = []  # stored since between_blocks() last ran
        self.written: set[str] = set()  # the packs this commit wrote

    def pack_of(self, digest: bytes, chunk: bytes | memoryview) -> str:
        """The pack that holds, or will hold, a chunk the index does not know."""
        pack_id = self._pending.get(digest)
        if pack_id is None:
            pack_id = self._pending[digest] = self._builder.pack_id
            self._builder.add(digest, chunk)
            self.new_chunks += 1
            if self._builder.full():
                self._flush()
        return pack_id

    def pack_pages(self, digests: bytes, block: memoryview, new: npt.NDArray[np.int64]) -> set[str]:
        """`pack_of` for the whole pages `new` (indexes into `block` and its `digests`) at
        once; the packs that hold or will hold them. A first checkpoint stores every page,
        and one Python step per page here cost as much as hashing it: the dict work runs in
        C (map, zip, dict), the copying in numpy."""
        keys = np.frombuffer(digests, dtype=_DIGEST)[new].tolist()  # bytes objects, in C
        held = list(map(self._pending.get, keys))
        used = set(filter(None, held))
        missing = list(map(operator.is_, held, itertools.repeat(None)))
        # Each new digest once (zero pages repeat within a block); equal digests, equal pages.
        fresh = dict(
            zip(
                itertools.compress(keys, missing),
                itertools.compress(new.tolist(), missing),
                strict=True,
            )
        )
        at = np.fromiter(fresh.values(), dtype=np.int64, count=len(fresh))
        fresh_keys = list(fresh)
        done = 0
        while done < len(at):
            take = at[done : done + self._builder.room()]
            self._builder.add_pages(digests, block, take)
            pack_id = self._builder.pack_id
            self._pending.update(
                zip(fresh_keys[done : done + len(take)], itertools.repeat(pack_id))
            )
            used.add(pack_id)
            self.new_chunks += len(take)
            done += len(take)
            if self._builder.full():
                self._flush()
        return used

    def between_blocks(self) -> None:
        """Drop from `pending` the chunks of stored packs (the index has them now). Only
        between blocks: a block's index lookups ran before a pack filled in its middle was
        stored, and `pending` must still answer for it."""
        for done in self._stored:
            keys = np.frombuffer(done.digests, dtype=_DIGEST).tolist()
            collections.deque(map(self._pending.pop, keys, itertools.repeat(None)), maxlen=0)
        self._stored.clear()

    def finish(self) -> None:
        """Store the last pack and wait until every pack is durable (before the manifest)."""
        self._flush()
        self._settle(0)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._spare.clear()

    def _write(self, b: PackBuilder) -> int:
        self.written.add(b.pack_id)
        pieces, encoded_index = b.compress(self.level)
        pack, index = pack_key(b.pack_id, self.home), index_key(b.pack_id, self.home)
        # Sealed in 64 KiB segments (storage/crypto.py: a lazy restore opens only the ones
        # it needs), a slice at a time as it is written: no copy of the pack is held.
        size = sum(map(len, pieces))
        self.backend.put_pieces(pack, lambda: self.codec.seal_pack(pack, _slices(pieces), size))
        self.backend.put(index, self.codec.seal(index, encoded_index))  # after its pack
        self.index.add(b.pack_id, b.digests)
        pieces.clear()  # the views of the builder's buffer go before it is reused
        b.recycle()  # not after a failure: a view of its buffer may live in the traceback
        return size

    def _settle(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            fut, done = self._in_flight.pop(0)
            self.new_bytes += fut.result()
            self._stored.append(done)

    def _flush(self) -> None:
        if len(self._builder):
            self._settle(self.in_flight_max - 1)
            self._in_flight.append((self._pool.submit(self._write, self._builder), self._builder))
            self._builder = PackBuilder(self._spare, self.clock.wall())


def _slices(pieces: list[Piece]) -> Iterator[bytes | memoryview]:
    """The pieces of a pack in slices of about _SEAL_STEP: runs of raw pages cut, frames (a
    few KB each) joined, so that neither the cipher nor the file sees a call per chunk."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        if len(piece) >= _SEAL_STEP:
            if batch:
                yield b"".join(batch)
                batch, size = [], 0
            view = memoryview(piece)
            yield from (view[at : at + _SEAL_STEP] for at in range(0, len(view), _SEAL_STEP))
            continue
        batch.append(piece)
        size += len(piece)
        if size >= _SEAL_STEP:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)
