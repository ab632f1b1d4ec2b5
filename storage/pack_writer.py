"""The new chunks of one commit, packed and stored by writer threads while the next pack fills.

Two packs in flight (compressing or being stored) and one filling, with their buffers reused:
memory stays at three 4 MiB buffers plus their compressed copies, whatever the image size.
A chunk seen twice in one commit (zero pages) goes into one pack: `pending` answers for chunks
whose pack is not stored yet; once stored, the ChunkIndex does.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.crypto import Codec
from storage.keys import index_key, pack_key
from storage.manifest import DIGEST_SIZE
from storage.packs import PackBuilder


class PackWriter:
    def __init__(
        self,
        backend: BlobStore,
        codec: Codec,
        index: ChunkIndex,
        in_flight: int = 2,
        level: int = 1,
    ) -> None:
        self.backend = backend
        self.codec = codec
        self.index = index
        self.level = level
        self.in_flight_max = in_flight
        self.new_bytes = 0  # compressed bytes stored
        self.new_chunks = 0
        self._spare: list[bytearray] = []
        self._builder = PackBuilder(self._spare)
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

    def between_blocks(self) -> None:
        """Drop from `pending` the chunks of stored packs (the index has them now). Only
        between blocks: a block's index lookups ran before a pack filled in its middle was
        stored, and `pending` must still answer for it."""
        for done in self._stored:
            d = bytes(done.digests)
            for off in range(0, len(d), DIGEST_SIZE):
                self._pending.pop(d[off : off + DIGEST_SIZE], None)
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
        data, encoded_index = b.compress(self.level)
        pack, index = pack_key(b.pack_id), index_key(b.pack_id)
        # One seal (AES-GCM, one tag) per pack: a restore authenticates it in one call.
        self.backend.put(pack, self.codec.seal_pack(pack, data))
        self.backend.put(index, self.codec.seal(index, encoded_index))  # after its pack
        self.index.add(b.pack_id, b.digests)
        return len(data)

    def _settle(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            fut, done = self._in_flight.pop(0)
            self.new_bytes += fut.result()
            self._stored.append(done)

    def _flush(self) -> None:
        if len(self._builder):
            self._settle(self.in_flight_max - 1)
            self._in_flight.append((self._pool.submit(self._write, self._builder), self._builder))
            self._builder = PackBuilder(self._spare)
