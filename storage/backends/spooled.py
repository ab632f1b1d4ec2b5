"""A local spool and cache in front of a remote store: checkpoints go on when the remote is down.

Every put lands in a local folder first (durable, like any LocalBlobStore put) and is queued;
an uploader thread sends the queue to the remote strictly in order, so the remote sees packs
before the manifest that names them, exactly as a direct writer would have written them.
Deletes are queued the same way. Reads are served from the local copy when there is one (the
latest checkpoints stay restorable during an outage) and otherwise fetched and kept.

The queue is a folder of numbered files, one per operation, so it survives a daemon restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage.backends.base import BlobStore
from storage.backends.local import LocalBlobStore
from storage.errors import BlobExists, BlobNotFound, StorageError, TransientStorageError

log = logging.getLogger(__name__)
Entry = tuple[Path, str, str]  # queue file, "P" (put) or "D" (delete), key
Entries = list[Entry]
KeyList = list[str]
PendingOps = list[tuple[str, str]]
CacheFiles = list[tuple[float, int, str]]


_PACK_SUFFIX = ".pack"
_CACHE_QUEUE_MAX = 256 * 1024 * 1024  # bytes of blobs waiting to be copied into the cache
_CACHE_SETTLE = 0.5  # seconds without a new blob read before the copies are written
_CACHE_BATCH_MAX = 16 * 1024 * 1024  # or once this much waits (~1.5 GB of image's indexes)


class SpooledBlobStore(BlobStore):
    def __init__(
        self,
        remote: BlobStore,
        folder: Path,
        upload_concurrency: int = 4,
        cache_max_bytes: int = 2 * 1024**3,
        on_upload: Callable[[int], None] | None = None,
    ) -> None:
        self.remote = remote
        self.cache = LocalBlobStore(folder / "blobs")
        self.queue_dir = folder / "queue"
        self.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cache_max_bytes = cache_max_bytes
        self.on_upload = on_upload
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._seq = max(
            (int(p.name) for p in self.queue_dir.iterdir() if p.name.isdigit()), default=0
        )
        self.online = True
        self._stop = False
        self._pool = ThreadPoolExecutor(upload_concurrency, thread_name_prefix="upload")
        self._thread = threading.Thread(target=self._upload_loop, name="uploader", daemon=True)
        self._thread.start()
        # Blobs read from the remote are copied into the cache by a thread of their own: a
        # restore from the bucket then never waits for the local disk (an fsync per blob and
        # a scan of the cache cost it 40% of its download rate). Packs read are not cached
        # at all: writing them cost that restore a third of its CPU (0.7 of 2.3 s for 512
        # MB), and what they rebuilt is kept afterwards (the kept image, the disk images),
        # which serves the next restores better than packs would.
        self._to_cache: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._caching_bytes = 0
        self._caching_lock = threading.Lock()
        self._cacher = threading.Thread(target=self._cache_loop, name="cacher", daemon=True)
        self._cacher.start()

    def describe(self) -> str:
        return f"{self.remote.describe()} (spool and cache {self.cache.root.parent})"

    # -- the BlobStore interface -------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.cache.put(key, data)  # BlobExists here: a local writer already has it
        self._enqueue("P", key)

    def put_pieces(self, key: str, pieces: Callable[[], Iterable[bytes | memoryview]]) -> None:
        self.cache.put_pieces(key, pieces)
        self._enqueue("P", key)

    def get(self, key: str, limit: int | None = None) -> bytes:
        try:
            return self.cache.get(key, limit)
        except BlobNotFound:
            pass
        data = self.remote.get(key, limit)
        if not key.endswith(_PACK_SUFFIX):
            self._cache_later(key, data)
        return data

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        """From the local copy into the caller's buffer when there is one; else a pack (never
        cached) from the remote into it, and any other blob by `get`."""
        try:
            return self.cache.get_into(key, buffer, limit)
        except BlobNotFound:
            if key.endswith(_PACK_SUFFIX):
                return self.remote.get_into(key, buffer, limit)
            return self.get(key, limit)

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        """From the local copy when there is one, else from the bucket (not cached: a part)."""
        try:
            return self.cache.get_range(key, offset, length)
        except BlobNotFound:
            return self.remote.get_range(key, offset, length)

    def modified(self, key: str) -> float | None:
        """The bucket's time; a blob still only in the spool is as young as can be."""
        when = self.remote.modified(key)
        if when is None and key in set(self.pending_keys()):
            return time.time()
        return when

    def exists(self, key: str) -> bool:
        return self.cache.exists(key) or self.remote.exists(key)

    def list(self, prefix: str) -> Iterator[str]:
        keys = set(self.cache.list(prefix))
        deleted = {k for op, k in self._pending() if op == "D"}
        if not self.online:  # the uploader found the remote down: don't wait for it here
            return iter(sorted(keys - deleted))
        try:
            keys |= set(self.remote.list(prefix))
        except TransientStorageError as e:
            log.warning("listing %s from the local spool only: %s", prefix, e)
        return iter(sorted(keys - deleted))

    def delete(self, key: str) -> None:
        self.cache.delete(key)
        self._enqueue("D", key)

    # -- the queue ---------------------------------------------------------------------

    def _enqueue(self, op: str, key: str) -> None:
        with self._lock:
            self._seq += 1
            path = self.queue_dir / f"{self._seq:016d}"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                f.write(f"{op} {key}")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._wake.notify_all()

    def _entries(self) -> Entries:
        out = []
        for p in sorted(self.queue_dir.iterdir()):
            if not p.name.isdigit():
                continue
            with contextlib.suppress(FileNotFoundError):
                op, key = p.read_text().split(" ", 1)
                out.append((p, op, key))
        return out

    def _pending(self) -> PendingOps:
        return [(op, key) for _, op, key in self._entries()]

    def pending_keys(self) -> KeyList:
        """Keys written locally and not yet uploaded, oldest first."""
        return [key for op, key in self._pending() if op == "P"]

    def backlog_bytes(self) -> int:
        total = 0
        for key in self.pending_keys():
            with contextlib.suppress(FileNotFoundError):
                total += (self.cache.root / key).stat().st_size
        return total

    def discard(self, keys: set[str]) -> None:
        """Forget pending uploads (the spool is full): they never reach the remote."""
        with self._lock:
            for path, op, key in self._entries():
                if op == "P" and key in keys:
                    path.unlink(missing_ok=True)
                    self.cache.delete(key)

    def mark_online(self) -> None:
        """The caller reached the remote: list from it again, and upload now."""
        with self._lock:
            self.online = True
            self._wake.notify_all()

    def wait_uploaded(self, timeout: float) -> bool:
        """Wait until the queue is empty; False if it is not after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._entries():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.2))
        return True

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=10)
        self._to_cache.put(None)
        self._cacher.join(timeout=10)
        self._pool.shutdown(wait=False)

    def _upload_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._lock:
                while not self._stop and not self._entries():
                    self._wake.wait(5.0)
                if self._stop:
                    return
                batch = self._next_batch()
            try:
                self._send(batch)
            except StorageError as e:
                if self.online:
                    log.error("remote storage unreachable, checkpoints are spooled locally: %s", e)
                self.online = False
                with self._lock:
                    self._wake.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if not self.online:
                log.info("remote storage is back: uploading the spooled checkpoints")
            self.online, backoff = True, 1.0
            with self._lock:
                for path, _, _ in batch:
                    path.unlink(missing_ok=True)
                self._wake.notify_all()
            self._trim_cache()

    def _next_batch(self) -> Entries:
        """Packs may go up together; a manifest or a delete goes alone, after all before it."""
        entries = self._entries()
        batch: Entries = []
        for path, op, key in entries:
            barrier = op == "D" or key.startswith("manifests/")
            if barrier and batch:
                break
            batch.append((path, op, key))
            if barrier:
                break
        return batch

    def _send(self, batch: Entries) -> None:
        def one(op: str, key: str) -> None:
            if op == "D":
                self.remote.delete(key)
                return
            try:
                data = self.cache.get(key)
            except BlobNotFound:
                return  # discarded or deleted since
            # BlobExists: an earlier attempt got through; keys are unique, content-named.
            with contextlib.suppress(BlobExists):
                self.remote.put(key, data)
            if self.on_upload:
                self.on_upload(len(data))

        for f in [self._pool.submit(one, op, key) for _, op, key in batch]:
            f.result()

    def _cache_later(self, key: str, data: bytes) -> None:
        """Queue a copy of `data` for the cache; dropped if too much already waits (the cache
        only saves a later download)."""
        with self._caching_lock:
            if self._caching_bytes + len(data) > _CACHE_QUEUE_MAX:
                return
            self._caching_bytes += len(data)
        self._to_cache.put((key, data))

    def _cache_loop(self) -> None:
        while (item := self._to_cache.get()) is not None:
            # A restore reads its pack indexes in a burst: their copies are written once it
            # is over, not as they come (two fsyncs a copy took 0.2 s of CPU, of 1.8 s, from
            # a bucket restore on two cores). Held in memory meanwhile, _CACHE_BATCH_MAX at most.
            batch, size = [item], len(item[1])
            while size < _CACHE_BATCH_MAX:
                try:
                    more = self._to_cache.get(timeout=_CACHE_SETTLE)
                except queue.Empty:
                    break
                if more is None:
                    self._to_cache.put(None)  # stop once this batch is in
                    break
                batch.append(more)
                size += len(more[1])
            for key, data in batch:
                with contextlib.suppress(BlobExists, StorageError, OSError):
                    self.cache.put(key, data)
                with self._caching_lock:
                    self._caching_bytes -= len(data)
            with contextlib.suppress(OSError):  # one scan of the cache a burst, not one a blob
                self._trim_cache()

    def wait_cached(self, timeout: float = 30.0) -> bool:
        """Wait until every blob read so far is in the cache (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._caching_lock:
                if self._caching_bytes == 0:
                    return True
            time.sleep(0.01)
        return False

    def _trim_cache(self) -> None:
        """Keep the local copies under cache_max_bytes, dropping the oldest uploaded ones."""
        pending = set(self.pending_keys())
        files: CacheFiles = []
        total = 0
        for key in self.cache.list(""):
            with contextlib.suppress(FileNotFoundError):
                st = (self.cache.root / key).stat()
                total += st.st_size
                if key not in pending and not key.startswith("manifests/"):
                    files.append((st.st_mtime, st.st_size, key))
        if total <= self.cache_max_bytes:
            return
        for _, size, key in sorted(files):
            self.cache.delete(key)
            total -= size
            if total <= self.cache_max_bytes:
                return
