"""The spool's read cache: blobs read from the remote copied into the local cache, kept small.

A restore from the bucket must never wait for the local disk (an fsync per blob and a scan of
the cache cost it 40% of its download rate), so the copies are written by a thread of their
own, after the burst of reads is over, and the cache is trimmed once a burst, not once a blob.
What the trim may never drop (a blob still queued for upload, an uploaded pack whose manifest
is not) is the spool's to say: it passes `protected` and `in_use`, asked under its lock.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable

from storage.backends.local import LocalBlobStore
from storage.errors import BlobExists, StorageError
from storage.keys import MANIFESTS

CacheFiles = list[tuple[float, int, str]]

_QUEUE_MAX = 256 * 1024 * 1024  # bytes of blobs waiting to be copied into the cache
_SETTLE = 0.5  # seconds without a new blob read before the copies are written
_BATCH_MAX = 16 * 1024 * 1024  # or once this much waits (~1.5 GB of image's indexes)


class CacheFiller:
    def __init__(
        self,
        cache: LocalBlobStore,
        max_bytes: int,
        lock: threading.Lock,
        protected: Callable[[], set[str]],
        in_use: Callable[[str], bool],
    ) -> None:
        """`protected()` names the blobs the trim must keep (called under `lock`);
        `in_use(key)` is asked again under `lock` at the moment of deleting, since a put may
        have started since the scan."""
        self.cache = cache
        self.max_bytes = max_bytes
        self._lock = lock
        self._protected = protected
        self._in_use = in_use
        self._to_cache: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._waiting_bytes = 0
        self._waiting_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cacher", daemon=True)
        self._thread.start()

    def later(self, key: str, data: bytes) -> None:
        """Queue a copy of `data` for the cache; dropped if too much already waits (the cache
        only saves a later download)."""
        with self._waiting_lock:
            if self._waiting_bytes + len(data) > _QUEUE_MAX:
                return
            self._waiting_bytes += len(data)
        self._to_cache.put((key, data))

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait until every blob queued so far is in the cache and the cache trimmed (tests,
        benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._waiting_lock:
                if self._waiting_bytes == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._to_cache.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (item := self._to_cache.get()) is not None:
            # A restore reads its pack indexes in a burst: their copies are written once it
            # is over, not as they come (two fsyncs a copy took 0.2 s of CPU, of 1.8 s, from
            # a bucket restore on two cores). Held in memory meanwhile, _BATCH_MAX at most.
            batch, size = [item], len(item[1])
            while size < _BATCH_MAX:
                try:
                    more = self._to_cache.get(timeout=_SETTLE)
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
            with contextlib.suppress(OSError):  # one scan of the cache a burst, not one a blob
                self.trim()
            with self._waiting_lock:  # after the trim: `wait` sees the cache settled
                self._waiting_bytes -= size

    def trim(self) -> None:
        """Keep the local copies under max_bytes, dropping the oldest unprotected ones
        (manifests are never dropped: an outage's restore and `list_local` answer from them)."""
        with self._lock:
            protected = self._protected()
        files: CacheFiles = []
        total = 0
        for key in self.cache.list(""):
            with contextlib.suppress(FileNotFoundError):
                st = (self.cache.root / key).stat()
                total += st.st_size
                if key not in protected and not key.startswith(MANIFESTS):
                    files.append((st.st_mtime, st.st_size, key))
        if total <= self.max_bytes:
            return
        for _, size, key in sorted(files):
            with self._lock:  # decided again at the moment of deleting: a put may be under way
                if self._in_use(key):
                    continue
                self.cache.delete(key)
            total -= size
            if total <= self.max_bytes:
                return
