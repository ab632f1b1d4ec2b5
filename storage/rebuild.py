"""Rebuilding a checkpoint's folder from its packs, a few packs at a time on every core.

The manifest says which packs hold the checkpoint's chunks and where they live (its
workload's prefix, or the legacy flat layout: `Manifest.pack_home`). `concurrency` packs are
fetched at once and one per core decoded and written: where each chunk goes is
storage/wanted_chunks.py, putting a pack's chunks in place storage/page_writing.py.

Zero pages are never fetched: the files are created sparse at their size, so a chunk whose
digest is that of a zero page already reads back as what it is.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from storage.errors import CorruptCheckpoint
from storage.manifest import Manifest
from storage.pack_reading import PackReader
from storage.page_writing import Scratch
from storage.wanted_chunks import Matches, WantedChunks

ProgressFn = Callable[[int], None]  # called with bytes just done


def materialize(
    repo: PackReader,
    workload: str,
    checkpoint_id: str,
    dest: Path,
    progress: ProgressFn | None = None,
    seed: tuple[str, Path] | None = None,
) -> Manifest:
    """Rebuild a checkpoint's folder in `dest` from what `repo` reads (the repository, or any
    PackReader: storage/pack_reading.py): see Repository.materialize."""
    manifest = repo.read_manifest(workload, checkpoint_id)
    where = f"checkpoint {checkpoint_id} of {workload}"
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Files are created relative to the folder's descriptor, by flat name, never following
    # a symlink: a name in a manifest can only ever land inside `dest`.
    dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    fds: list[int] = []
    try:
        os.fchmod(dir_fd, 0o700)
        for entry in manifest.files:
            if "/" in entry.name or entry.name in (".", ".."):
                raise CorruptCheckpoint(f"{where}: unsafe file name {entry.name!r}")
            fd = os.open(
                entry.name,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                0o600,
                dir_fd=dir_fd,
            )
            fds.append(fd)
            os.ftruncate(fd, entry.size)
        wanted = WantedChunks(manifest)
        zeros = wanted.skip_zero_pages(repo.codec.chunk_id(bytes(manifest.chunk_size)))
        if progress and zeros:
            progress(zeros)
        if seed is not None:
            copied = wanted.copy_from_seed(
                fds,
                repo.read_manifest(workload, seed[0]),
                seed[1],
                [f.size for f in manifest.files],
            )
            if progress:
                progress(copied)
        # An encrypted repository's tag vouches for every chunk of a pack; in clear, each
        # chunk is hashed again.
        chunk_id = None if repo.codec.authenticates else repo.codec.chunk_id
        scratch = Scratch()
        # `concurrency` packs are fetched at once (a bucket's latency wants several), but only
        # one per core is decoded and written: more only contend for the cores and the caches.
        # A thread that has its pack gives its fetching slot up before it waits for a core, so
        # `concurrency` downloads stay in flight while packs are decoded: a link to a bucket
        # is never left idle by the decoding.
        n_cores = min(repo.concurrency, os.cpu_count() or 1)
        fetching = threading.BoundedSemaphore(repo.concurrency)
        cores = threading.BoundedSemaphore(n_cores)

        def rebuild(pack_id: str) -> int:
            """Read, open, decode and write (in a reader thread) what a pack holds for this
            checkpoint; bytes written."""
            with fetching:
                index = repo.index_for(pack_id, manifest.pack_home, where)
                matches = wanted.find(index.digests)
                if not len(matches.entries):
                    return 0  # a pack whose chunks are all written (or zero pages) is not read
                data = repo.pack_for(pack_id, manifest.pack_home, where, scratch.pack_buffer)
            claimed = wanted.claim(matches)
            if not len(claimed.entries):
                return 0
            with cores:
                return wanted.write_pack(
                    fds, pack_id, index, claimed, data, scratch, chunk_id, where
                )

        threads = repo.concurrency + n_cores
        with ThreadPoolExecutor(threads, thread_name_prefix="pack-reader") as pool:
            # Packs go to whichever thread is free; a few queued per thread keep them busy
            # (memory is each thread's buffers, not the queue).
            packs = iter(manifest.packs)
            pending = {pool.submit(rebuild, p) for p in itertools.islice(packs, 4 * threads)}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        done = fut.result()
                        if progress and done:
                            progress(done)
                    pending |= {
                        pool.submit(rebuild, p) for p in itertools.islice(packs, len(finished))
                    }
            finally:
                for fut in pending:
                    fut.cancel()
        wanted.check_complete(where)
        for fd, entry in zip(fds, manifest.files, strict=True):
            os.fsync(fd)
            os.fchmod(fd, entry.mode & 0o700 or 0o600)
    finally:
        for fd in fds:
            os.close(fd)
        os.close(dir_fd)
    return manifest


__all__ = ["Matches", "PackReader", "WantedChunks", "materialize"]
