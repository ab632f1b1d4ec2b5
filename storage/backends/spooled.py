"""A local spool and cache in front of a remote store: checkpoints go on when the remote is down.

Every put lands in a local folder first (durable, like any LocalBlobStore put) and is queued;
an uploader thread sends the queue to the remote strictly in order, so the remote sees packs
before the manifest that names them, exactly as a direct writer would have written them.
Deletes are queued the same way (storage/backends/spool_queue.py: it survives a restart).

The remote is the truth about what exists; the local copies are only a cache of immutable
blobs by exact key (docs/fleet.md, R1). So `exists` and `list` ask the remote, adding what this
host has queued and not uploaded yet and taking away what it queued for deletion, and raise
when the remote cannot answer: a cached copy of a manifest another host deleted, or a pack
another host collected, must never look present. A listing forgets the cached copies of what
it no longer shows. `list_local` is the explicit, partial answer for an outage. Reads by key
are served from the local copy when there is one, and otherwise fetched (and kept).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage.backends.base import BlobStore
from storage.backends.cache_filler import CacheFiller
from storage.backends.local import LocalBlobStore
from storage.backends.spool_backoff import Backoff, Streak, Trouble
from storage.backends.spool_queue import Entries, SpoolQueue, older_than
from storage.errors import BlobExists, BlobNotFound, StorageError, TransientStorageError
from storage.keys import MANIFESTS

log = logging.getLogger(__name__)
KeyList = list[str]


_PACK_SUFFIX = ".pack"


class SpooledBlobStore(BlobStore):
    def __init__(
        self,
        remote: BlobStore,
        folder: Path,
        upload_concurrency: int = 4,
        cache_max_bytes: int = 2 * 1024**3,
        on_upload: Callable[[int], None] | None = None,
        recheck_after: float = 3 * 3600,
    ) -> None:
        """`recheck_after`: packs that reached the remote longer ago than this before the
        manifest that names them are looked up again first (half the GC grace: another
        host's GC may have found them unreferenced meanwhile)."""
        self.remote = remote
        self.cache = LocalBlobStore(folder / "blobs")
        self.queue_dir = folder / "queue"
        self.queue = SpoolQueue(self.queue_dir)
        self.on_upload = on_upload
        self.recheck_after = recheck_after
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._records = threading.Event()  # set once a handler of records is registered
        self._putting: Counter[str] = Counter()  # puts between local copy and queue entry
        self._streak = Streak()  # why nothing uploads now, if nothing does
        self._backoff = Backoff(self._wake)
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
        self.filler = CacheFiller(
            self.cache, cache_max_bytes, self._lock, self._kept_in_cache, self._in_use
        )

    def describe(self) -> str:
        return f"{self.remote.describe()} (spool and cache {self.cache.root.parent})"

    # -- the BlobStore interface -------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.put_pieces(key, lambda: (data,))

    def put_pieces(self, key: str, pieces: Callable[[], Iterable[bytes | memoryview]]) -> None:
        # Between the local copy and its queue entry the blob is neither cached-only nor
        # pending: the cache's trim must not run then (it would drop a blob to upload).
        with self._lock:
            self._putting[key] += 1
        try:
            self.cache.put_pieces(key, pieces)  # BlobExists: a local writer already has it
            self._enqueue("P", key)
        finally:
            with self._lock:
                self._putting[key] -= 1
                if self._putting[key] <= 0:
                    del self._putting[key]

    def get(self, key: str, limit: int | None = None) -> bytes:
        try:
            return self.cache.get(key, limit)
        except BlobNotFound:
            pass
        data = self.remote.get(key, limit)
        if not key.endswith(_PACK_SUFFIX):
            self.filler.later(key, data)
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
        """The remote's answer, or this host's own pending write or delete of `key`; never
        the cache's (another host may have collected what is cached here)."""
        with self._lock:
            if self.queue.pending_put(key):
                return True
            if self.queue.pending_delete(key):
                return False
        self._refuse_offline(f"look up {key}")
        return self.remote.exists(key)

    def list(self, prefix: str) -> Iterator[str]:
        """The remote's listing with this host's pending puts added and pending deletes taken
        away; raises TransientStorageError when the remote cannot answer (never a listing of
        the cache alone: see list_local). Cached copies the listing no longer shows are
        forgotten: another host deleted them."""
        self._refuse_offline(f"list {prefix}")
        with self._lock:
            puts, deletes = self.queue.pending_puts(), self.queue.pending_deletes()
        remote = set(self.remote.list(prefix))
        with self._lock:  # what was uploaded (or deleted) while the remote listed
            puts |= self.queue.pending_puts()
            deletes |= self.queue.pending_deletes()
            keys = (remote | {k for k in puts if k.startswith(prefix)}) - deletes
            waiting = {key for _, key, _ in self.queue.uploaded()}  # _recheck_before's copies
            for key in set(self.cache.list(prefix)) - keys - puts - waiting:
                self.cache.delete(key)
        return iter(sorted(keys))

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        """The bucket's listing with its versions: versions are the bucket's alone (leases
        and heartbeats are written there directly, never through the spool)."""
        self._refuse_offline(f"list {prefix}")
        return self.remote.list_versions(prefix)

    def list_local(self, prefix: str) -> KeyList:
        """What this host holds locally under `prefix` (its cache and its pending uploads),
        less its pending deletes: partial by nature, for a decision that must be taken
        during an outage and knows it (docs/fleet.md, R1)."""
        with self._lock:
            deletes = self.queue.pending_deletes()
        return sorted(set(self.cache.list(prefix)) - deletes)

    def authoritative(self) -> BlobStore:
        return self.remote

    def is_pending(self, key: str) -> bool:
        """Whether `key` was written here and has not reached the remote yet."""
        with self._lock:
            return self.queue.pending_put(key)

    @property
    def online(self) -> bool:
        """Whether uploads go through (the gauge checkpointer_storage_online): False while
        the remote is unreachable, and while the queue folder does not read."""
        return self._streak.trouble not in (Trouble.REMOTE, Trouble.QUEUE)

    def _refuse_offline(self, what: str) -> None:
        # The uploader found the remote down: fail now, not after retries. (A local queue
        # folder that does not read says nothing of the remote: ask it.)
        if self._streak.trouble is Trouble.REMOTE:
            raise TransientStorageError(
                f"cannot {what}: object storage ({self.remote.describe()}) is unreachable "
                "(the spool's uploads are failing); the answer must come from the bucket"
            )

    def delete(self, key: str) -> None:
        self.cache.delete(key)
        self._enqueue("D", key)

    def needs(self, key: str, needed: KeyList) -> None:
        """Remembered with the queue: the uploader checks these are still in the bucket
        before it sends `key`, and keeps their local copies until then."""
        with self._lock:
            self.queue.set_needs(key, needed)

    def after_uploads(self, record: str) -> None:
        """Queued: applied (`handle_records`) once everything queued before it is uploaded,
        in order, after a restart too. A head may only name a manifest the bucket has."""
        self._enqueue("R", record)

    def pending_records(self) -> KeyList:
        return [key for _, op, key in self._entries() if op == "R"]

    # -- the queue ---------------------------------------------------------------------

    def _enqueue(self, op: str, key: str) -> None:
        with self._lock:
            self.queue.add(op, key)
            self._wake.notify_all()

    def _entries(self) -> Entries:
        return self.queue.entries()

    def pending_keys(self) -> KeyList:
        """Keys written locally and not yet uploaded, oldest first."""
        return [key for _, op, key in self._entries() if op == "P"]

    def backlog_bytes(self) -> int:
        total = 0
        for key in self.pending_keys():
            with contextlib.suppress(FileNotFoundError):
                total += (self.cache.root / key).stat().st_size
        return total

    def discard(self, keys: set[str]) -> None:
        """Forget pending uploads (the spool is full): they never reach the remote."""
        with self._lock:
            for entry in self._entries():
                _, op, key = entry
                if op == "P" and key in keys:
                    self.queue.remove(entry)
                    self.cache.delete(key)

    def mark_online(self) -> None:
        """The caller reached the remote: list from it again, and upload now."""
        with self._lock:
            if self._streak.trouble is Trouble.REMOTE:
                self._streak.trouble = None
            self._backoff.cut_short()
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
        self.filler.close()
        self._pool.shutdown(wait=False)

    def wait_cached(self, timeout: float = 30.0) -> bool:
        """Wait until every blob read so far is in the cache (tests, benchmarks)."""
        return self.filler.wait(timeout)

    def _kept_in_cache(self) -> set[str]:
        """What the cache's trim must keep: blobs still queued, and uploaded packs whose
        manifest is not (see _recheck_before). Called under self._lock."""
        return self.queue.pending_puts() | {key for _, key, _ in self.queue.uploaded()}

    def _in_use(self, key: str) -> bool:
        """A put under way or queued (asked again at the moment of deleting a cached copy)."""
        return key in self._putting or self.queue.pending_put(key)

    def handle_records(self, apply: Callable[[str], None]) -> None:
        super().handle_records(apply)
        self._records.set()

    def _upload_loop(self) -> None:
        """Uploads the queue in order until `close`. No failure ends it (it is the only thread
        that uploads): each is logged once per streak, then retried after a back-off that
        puts do not cut short (storage/backends/spool_backoff.py)."""
        while True:
            try:
                with self._lock:
                    while not self._stop and not self._entries():
                        self._wake.wait(5.0)
                    if self._stop:
                        return
                    batch = self._next_batch()
            except OSError as e:  # EIO, EMFILE: the queue folder did not read
                self._streak.failed(
                    Trouble.QUEUE,
                    "the uploader cannot read its queue in %s (%s): nothing uploads, checkpoints "
                    "stay in the spool; trying again with a back-off up to %.0f s",
                    self.queue_dir,
                    e,
                    self._backoff.cap,
                )
                self._backoff.wait(self._stopping)
                continue
            self._streak.cleared(Trouble.QUEUE)
            if batch[0][1] == "R" and not self._records.is_set():
                with self._lock:  # queued before a restart: wait for the repository's handler
                    self._wake.wait(0.2)
                continue
            try:
                if self._recheck_before(batch):
                    self._send(batch)
            except StorageError as e:
                self._streak.failed(
                    Trouble.REMOTE,
                    "remote storage unreachable, checkpoints are spooled locally: %s",
                    e,
                )
                self._backoff.wait(self._stopping)
                continue
            except Exception:  # a bug or a local disk error: never the end of the uploads
                self._streak.failed(
                    Trouble.UPLOAD,
                    "the uploader failed on %s; trying again with a back-off",
                    batch[0][2],
                    trace=True,
                )
                self._backoff.wait(self._stopping)
                continue
            self._streak.cleared()
            self._backoff.reset()
            with self._lock:
                self.queue.done(batch)
                self._wake.notify_all()
            self.filler.trim()

    def _stopping(self) -> bool:
        return self._stop

    def _next_batch(self) -> Entries:
        """Packs may go up together; a manifest or a delete goes alone, after all before it."""
        entries = self._entries()
        batch: Entries = []
        for path, op, key in entries:
            barrier = op in ("D", "R") or key.startswith(MANIFESTS)
            if barrier and batch:
                break
            batch.append((path, op, key))
            if barrier:
                break
        return batch

    def _recheck_before(self, batch: Entries) -> bool:
        """Before a manifest goes up: the packs queued before it that reached the remote
        long ago may have been collected meanwhile by another host's GC (they were
        unreferenced until now: an outage held the manifest back). Look them up, and send
        the missing ones again from the local copy; the manifest never names a pack gone.
        So too for a pack its commit wrote that never went up (its queue entry was set aside
        as corrupt, spool_queue.py). False: the manifest was dropped instead (a pack gone
        with no local copy left)."""
        head = batch[0]
        if head[1] != "P" or not head[2].startswith(MANIFESTS):
            return True
        with self._lock:
            needed = self.queue.needs(head[2])
            uploaded = [
                u
                for u in self.queue.uploaded(before=self.queue.seq_of(head))
                if needed is None or u[1] in needed
            ]
        lost = needed - {key for _, key, _ in uploaded} if needed is not None else set()
        for key in [k for _, k, _ in older_than(uploaded, self.recheck_after)] + sorted(lost):
            if self.remote.exists(key):
                continue
            try:
                data = self.cache.get(key)
            except BlobNotFound:
                log.error(
                    "%s is not in the bucket (collected, or never sent) while %s waited in "
                    "the spool, and no local copy is left: that checkpoint is dropped, never "
                    "uploaded half",
                    key,
                    head[2],
                )
                with self._lock:
                    self.queue.remove(head)
                    self.cache.delete(head[2])
                    self._wake.notify_all()
                return False
            log.warning("%s is not in the bucket (collected, or never sent): sending it again", key)
            with contextlib.suppress(BlobExists):
                self.remote.put(key, data)
        return True

    def _send(self, batch: Entries) -> None:
        def one(op: str, key: str) -> None:
            if op == "R":
                self.apply_record(key)
                return
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
