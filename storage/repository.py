"""The repository: folders in, folders out, deduplicated by content.

Write path (commit): every file is cut into fixed CHUNK_SIZE chunks (4 KiB: memory images are
raw pages, so page-sized chunks dedup scattered page changes, and a page inserted in the middle
shifts the rest by whole chunks), each hashed with BLAKE3; chunks the repository already holds
(the ChunkIndex, looked up a 1 MiB block at a time) are only referenced, new ones are copied
into packs that writer threads compress and store while the next pack fills. Packs and their
indexes are written first, the manifest last: a checkpoint without a manifest does not exist.

Read path (materialize): the manifest's packs are fetched a few at a time; the chunks of a pack
the checkpoint needs are found with one vectorised search, decompressed on every core, re-hashed
and written where they belong. Memory is a few packs plus 44 bytes a chunk, with no Python
object per chunk.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from storage.backends.base import BlobStore
from storage.chunk_index import ChunkIndex
from storage.errors import BlobExists, BlobNotFound, CheckpointNotFound, CorruptCheckpoint
from storage.manifest import (
    DIGEST_SIZE,
    FileEntry,
    Manifest,
    check_workload_name,
    is_checkpoint_id,
    new_checkpoint_id,
)
from storage.pack_writer import PackWriter
from storage.packs import (
    IndexArrays,
    decode_index_arrays,
    index_key,
    pack_created,
    pack_id_of_index_key,
    pack_id_of_key,
    pack_key,
)
from storage.rebuild import PackChunks, WantedChunks, decompress_pack
from storage.rwlock import RWLock

CHUNK_SIZE = 4096
_READ_BLOCK = 1024 * 1024
_PACKS_IN_FLIGHT = 2
_ZSTD_LEVEL = 1


def manifest_key(workload: str, checkpoint_id: str) -> str:
    return f"manifests/{workload}/{checkpoint_id}.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """What `list` shows of a checkpoint without reading its chunks."""

    id: str
    workload: str
    created: datetime
    size_bytes: int
    new_bytes: int
    metadata: dict[str, Any]


ProgressFn = Callable[[int], None]  # called with bytes just done
KNOWN_TTL = 900.0  # reload the digests of other writers' packs this often


@dataclass
class GcReport:
    referenced_packs: int = 0
    deleted_packs: list[str] = field(default_factory=list)
    kept_young: int = 0  # unreferenced but younger than the grace period (maybe in flight)


class Repository:
    """Checkpoints of workloads over any BlobStore. Safe to use from several threads.

    Commits run concurrently (each writes its own packs); garbage collection and spool
    shedding wait for them and run alone (a readers-writer lock). Across processes and hosts,
    a pack younger than the grace period is never collected: it may belong to a commit whose
    manifest is not written yet.
    """

    def __init__(
        self, backend: BlobStore, concurrency: int = 4, gc_grace: float = 6 * 3600
    ) -> None:
        self.backend = backend
        self.concurrency = max(1, concurrency)
        self.gc_grace = gc_grace
        self._lock = threading.Lock()
        self._gc_lock = RWLock()
        self._index: ChunkIndex | None = None  # durable packs only
        self._index_at = 0.0
        # manifest key -> (info, packs): see _summary
        self._summaries: dict[str, tuple[CheckpointInfo, tuple[str, ...]]] = {}

    # -- write -------------------------------------------------------------------------

    def commit(
        self, workload: str, folder: Path, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        """Store the files under `folder` as a new checkpoint of `workload`; return its manifest."""
        check_workload_name(workload)
        with self._gc_lock.shared():
            return self._commit(workload, folder, metadata or {})

    def _commit(self, workload: str, folder: Path, metadata: dict[str, Any]) -> Manifest:
        index = self._chunk_index()
        cid = new_checkpoint_id()
        writer = PackWriter(self.backend, index, _PACKS_IN_FLIGHT, _ZSTD_LEVEL)
        used_packs: set[str] = set()
        files: list[FileEntry] = []
        size_bytes = total_chunks = 0
        buf = bytearray(_READ_BLOCK)
        try:
            for rel, path in _walk_files(folder):
                st = path.stat()
                digests = bytearray()
                with open(path, "rb", buffering=0) as f:
                    while n := _read_full(f, buf):
                        writer.between_blocks()
                        block = memoryview(buf)[:n]
                        block_digests = b"".join(
                            [
                                blake3.blake3(block[o : o + CHUNK_SIZE]).digest()
                                for o in range(0, n, CHUNK_SIZE)
                            ]
                        )
                        digests += block_digests
                        where = index.lookup(block_digests)
                        total_chunks += len(where)
                        used_packs.update(index.pack_id(p) for p in np.unique(where[where >= 0]))
                        for i in np.flatnonzero(where < 0).tolist():
                            digest = block_digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                            chunk = block[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
                            used_packs.add(writer.pack_of(digest, chunk))
                size_bytes += st.st_size
                files.append(FileEntry(rel, st.st_size, st.st_mode & 0o777, digests))
            writer.finish()
        finally:
            writer.close()
        new_bytes, new_chunks = writer.new_bytes, writer.new_chunks

        manifest = Manifest(
            id=cid,
            workload=workload,
            created=datetime.now(UTC),
            chunk_size=CHUNK_SIZE,
            files=files,
            packs=sorted(used_packs),
            metadata=metadata,
            size_bytes=size_bytes,
            new_bytes=new_bytes,
            new_chunks=new_chunks,
            total_chunks=total_chunks,
        )
        self.backend.put(manifest_key(workload, cid), manifest.to_json())
        info = CheckpointInfo(cid, workload, manifest.created, size_bytes, new_bytes, metadata)
        with self._lock:
            self._summaries[manifest_key(workload, cid)] = (info, tuple(manifest.packs))
        return manifest

    def _chunk_index(self) -> ChunkIndex:
        """The chunks a new checkpoint may reference, by pack.

        A pack is trusted if a manifest references it, or if it is young: an old pack that no
        manifest references (a killed writer's) may be collected by another host at any moment.
        """
        with self._lock:
            if self._index is not None and time.monotonic() - self._index_at < KNOWN_TTL:
                return self._index
        referenced = self._referenced_packs()
        cutoff = time.time() - self.gc_grace / 2

        def trusted() -> Iterator[tuple[str, bytes]]:
            for key in self.backend.list("packs/"):
                pack_id = pack_id_of_index_key(key)
                if pack_id is None:
                    continue
                if pack_id not in referenced and pack_created(pack_id) < cutoff:
                    continue
                try:
                    yield pack_id, decode_index_arrays(self.backend.get(key), key).digests
                except (BlobNotFound, CorruptCheckpoint):
                    continue  # collected meanwhile, or damaged: don't dedup against it

        fresh = ChunkIndex()
        fresh.add_many(trusted())
        with self._lock:
            if self._index is not None:  # keep what commits added while we listed
                self._index.merge_into(fresh)
            self._index, self._index_at = fresh, time.monotonic()
            return fresh

    def _forget_packs(self, pack_ids: set[str]) -> None:
        with self._lock:
            if self._index is not None:
                self._index.forget(pack_ids)

    def _referenced_packs(self) -> set[str]:
        listed: set[str] = set()
        refs: set[str] = set()
        for key in self.backend.list("manifests/"):
            parts = key.split("/")
            if len(parts) != 3 or not parts[2].endswith(".json"):
                continue
            listed.add(key)
            try:
                refs.update(self._summary(parts[1], parts[2][:-5])[1])
            except (CheckpointNotFound, CorruptCheckpoint, ValueError):
                continue
        with self._lock:
            for key in set(self._summaries) - listed:
                del self._summaries[key]
        return refs

    # -- read --------------------------------------------------------------------------

    def checkpoints(self, workload: str) -> list[CheckpointInfo]:
        """Committed checkpoints of `workload`, newest first."""
        check_workload_name(workload)
        infos = []
        for key in self.backend.list(f"manifests/{workload}/"):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not is_checkpoint_id(name[:-5]):
                continue
            try:
                infos.append(self.info(workload, name[:-5]))
            except (CorruptCheckpoint, CheckpointNotFound):
                continue  # listed but unreadable: `verify` reports it; don't hide the others
        infos.sort(key=lambda i: i.id, reverse=True)
        return infos

    def info(self, workload: str, checkpoint_id: str) -> CheckpointInfo:
        """What `list` shows of one checkpoint, without its chunk list."""
        return self._summary(workload, checkpoint_id)[0]

    def _summary(self, workload: str, checkpoint_id: str) -> tuple[CheckpointInfo, tuple[str, ...]]:
        """A checkpoint's info and packs. Manifests never change once written, so each is
        parsed once (a 1 GB image's manifest is ~11 MB of JSON, ~30 MB while parsed) and this
        small summary remembered; `delete` and listings forget the ones gone."""
        key = manifest_key(workload, checkpoint_id)
        with self._lock:
            cached = self._summaries.get(key)
        if cached is not None:
            return cached
        m = self.read_manifest(workload, checkpoint_id)
        summary = (
            CheckpointInfo(m.id, workload, m.created, m.size_bytes, m.new_bytes, m.metadata),
            tuple(m.packs),
        )
        with self._lock:
            self._summaries[key] = summary
        return summary

    def workloads(self) -> list[str]:
        keys = self.backend.list("manifests/")
        names = {key.split("/")[1] for key in keys if key.count("/") == 2}
        return sorted(names)

    def read_manifest(self, workload: str, checkpoint_id: str) -> Manifest:
        check_workload_name(workload)
        if not is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFound(
                f"{checkpoint_id!r} is not a checkpoint id; "
                f"see `checkpointer list {workload}` for the ids"
            )
        key = manifest_key(workload, checkpoint_id)
        try:
            raw = self.backend.get(key)
        except BlobNotFound as e:
            raise CheckpointNotFound(
                f"workload {workload} has no checkpoint {checkpoint_id}; "
                f"see `checkpointer list {workload}`"
            ) from e
        manifest = Manifest.from_json(raw, f"checkpoint {checkpoint_id} of {workload}")
        if manifest.id != checkpoint_id or manifest.workload != workload:
            raise CorruptCheckpoint(
                f"checkpoint {checkpoint_id} of {workload}: manifest names "
                f"{manifest.workload}/{manifest.id}"
            )
        return manifest

    def materialize(
        self,
        workload: str,
        checkpoint_id: str,
        dest: Path,
        progress: ProgressFn | None = None,
        seed: tuple[str, Path] | None = None,
    ) -> Manifest:
        """Rebuild the checkpointed folder in `dest` (created 0700), verifying every chunk.

        `seed` is (checkpoint id, folder): a folder the caller knows to hold exactly the files
        of another checkpoint of the same workload (the kept newest image); the chunks found
        there are copied from it instead of fetched. Raises CorruptCheckpoint naming the
        checkpoint if any chunk is missing or damaged.
        """
        manifest = self.read_manifest(workload, checkpoint_id)
        where = f"checkpoint {checkpoint_id} of {workload}"
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(dest, 0o700)
        fds: list[int] = []
        try:
            for entry in manifest.files:
                target = dest / entry.name
                if target.resolve().parent != dest.resolve() / Path(entry.name).parent:
                    raise CorruptCheckpoint(f"{where}: unsafe file name {entry.name!r}")
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                fds.append(fd)
                os.ftruncate(fd, entry.size)
            wanted = WantedChunks(manifest)
            if seed is not None:
                copied = wanted.copy_from_seed(
                    fds,
                    self.read_manifest(workload, seed[0]),
                    seed[1],
                    [f.size for f in manifest.files],
                )
                if progress:
                    progress(copied)

            def fetch(pack_id: str) -> PackChunks | None:
                """Read and decompress (in a reader thread, off the GIL) what a pack holds
                for this checkpoint; the main thread verifies and writes it."""
                index = self._read_index(pack_id, where)
                matches = wanted.find(index.digests)
                if not len(matches.entries):
                    return None
                data = self._read_pack(pack_id, where)
                return decompress_pack(pack_id, index, matches, data, where, wanted.sizes)

            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="pack-reader") as pool:
                # A window of `concurrency` packs in flight keeps memory bounded.
                packs = iter(manifest.packs)
                window = [pool.submit(fetch, p) for p in itertools.islice(packs, self.concurrency)]
                while window:
                    fetched = window.pop(0).result()
                    nxt = next(packs, None)
                    if nxt is not None:
                        window.append(pool.submit(fetch, nxt))
                    if fetched is not None:
                        done = wanted.write(fds, fetched, where)
                        if progress:
                            progress(done)
            wanted.check_complete(where)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        for entry in manifest.files:
            os.chmod(dest / entry.name, entry.mode & 0o700 or 0o600)
        return manifest

    def _read_index(self, pack_id: str, where: str) -> IndexArrays:
        try:
            return decode_index_arrays(self.backend.get(index_key(pack_id)), index_key(pack_id))
        except BlobNotFound as e:
            raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where} is corrupt: {e}") from e

    def _read_pack(self, pack_id: str, where: str) -> bytes:
        try:
            return self.backend.get(pack_key(pack_id))
        except BlobNotFound as e:
            raise CorruptCheckpoint(f"{where} is incomplete: pack {pack_id} is missing") from e

    def verify(
        self, workload: str, checkpoint_id: str, progress: ProgressFn | None = None
    ) -> Manifest:
        """Re-hash every chunk of a checkpoint by materialising it into a scratch folder."""
        with tempfile.TemporaryDirectory(prefix="checkpointer-verify-") as tmp:
            return self.materialize(workload, checkpoint_id, Path(tmp), progress)

    # -- delete, pins, garbage collection ----------------------------------------------

    def delete(self, workload: str, checkpoint_id: str) -> None:
        """Forget a checkpoint. Its chunks stay until garbage collection finds them unused."""
        self._summary(workload, checkpoint_id)  # a clear error for an unknown id
        self.backend.delete(manifest_key(workload, checkpoint_id))
        with self._lock:
            self._summaries.pop(manifest_key(workload, checkpoint_id), None)

    def pins(self, workload: str) -> set[str]:
        return {k.rsplit("/", 1)[-1] for k in self.backend.list(f"pins/{workload}/")}

    def pin(self, workload: str, checkpoint_id: str) -> None:
        self._summary(workload, checkpoint_id)
        with contextlib.suppress(BlobExists):
            self.backend.put(f"pins/{workload}/{checkpoint_id}", b"")

    def unpin(self, workload: str, checkpoint_id: str) -> None:
        self.backend.delete(f"pins/{workload}/{checkpoint_id}")

    def gc(self, dry_run: bool = False, grace: float | None = None) -> GcReport:
        """Delete packs no manifest references and older than the grace period.

        The index goes first, then the pack (references before data): a reader never finds
        an index naming a missing pack.
        """
        grace = self.gc_grace if grace is None else grace
        report = GcReport()
        with self._gc_lock.exclusive():
            referenced = self._referenced_packs()
            report.referenced_packs = len(referenced)
            cutoff = time.time() - grace
            present: set[str] = set()
            for key in self.backend.list("packs/"):
                pid = pack_id_of_key(key)
                if pid:
                    present.add(pid)
            doomed = set()
            for pid in sorted(present - referenced):
                if pack_created(pid) > cutoff:
                    report.kept_young += 1
                    continue
                doomed.add(pid)
            report.deleted_packs = sorted(doomed)
            if dry_run or not doomed:
                return report
            self._forget_packs(doomed)
            for pid in sorted(doomed):
                self.backend.delete(index_key(pid))
                self.backend.delete(pack_key(pid))
        return report

    def shed(
        self,
        pending: list[str],
        discard: Callable[[set[str]], None],
        backlog: Callable[[], int],
        max_backlog: int,
    ) -> list[str]:
        """The spool is over `max_backlog`: drop the oldest checkpoints not yet uploaded.

        `pending` are the keys not yet uploaded, oldest first. A workload's newest checkpoint
        is never dropped. Packs go with a dropped checkpoint only if no checkpoint still
        waiting references them (what was uploaded cannot reference what was not: the queue
        is in order). Returns the dropped checkpoint ids.
        """
        dropped: list[str] = []
        with self._gc_lock.exclusive():
            manifests = [k for k in pending if k.startswith("manifests/")]
            newest: dict[str, str] = {}
            for k in manifests:
                newest[k.split("/")[1]] = k
            for key in manifests:
                if backlog() <= max_backlog:
                    break
                if newest.get(key.split("/")[1]) == key:
                    continue
                _, workload, name = key.split("/")
                dropped.append(name[:-5])
                remaining = [
                    m for m in manifests if m != key and m.rsplit("/", 1)[-1][:-5] not in dropped
                ]
                still_needed: set[str] = set()
                for m in remaining:
                    try:
                        still_needed.update(
                            self._summary(m.split("/")[1], m.rsplit("/", 1)[-1][:-5])[1]
                        )
                    except (CheckpointNotFound, CorruptCheckpoint):
                        continue
                try:
                    mine = set(self._summary(workload, name[:-5])[1])
                except (CheckpointNotFound, CorruptCheckpoint):
                    mine = set()
                pending_packs = {pack_id_of_key(k) for k in pending if k.startswith("packs/")}
                gone = (mine & pending_packs) - still_needed
                self._forget_packs({p for p in gone if p})
                keys = {key} | {k for k in pending if pack_id_of_key(k) in gone}
                discard(keys)
        return dropped


def _read_full(f: io.FileIO, buf: bytearray) -> int:
    """Fill `buf` unless the file ends first: chunks must start at multiples of CHUNK_SIZE."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _walk_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """Regular files under `folder`, sorted, as (relative name, path)."""
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            yield str(path.relative_to(folder)), path


__all__ = ["CHUNK_SIZE", "BlobExists", "CheckpointInfo", "Repository"]
