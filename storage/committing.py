"""The commit loop: a folder's files cut into chunks, new chunks packed, the manifest last.

Every file is cut into fixed CHUNK_SIZE chunks (4 KiB: memory images are raw pages, so
page-sized chunks dedup scattered page changes, and a page inserted in the middle shifts the
rest by whole chunks), each hashed (the codec's chunk id); chunks the workload's index already
holds (looked up a 1 MiB block at a time) are only referenced, new ones are copied into packs
that writer threads compress and store while the next pack fills (storage/pack_writer.py).
Packs go under the workload's own prefix and the manifest says so (`scoped_packs`): legacy
flat packs are never reused, so a workload's GC needs only its own manifests and its own
prefix (docs/fleet.md, R3). Packs and indexes first, the manifest last: a checkpoint without a
manifest does not exist. Kept apart from storage/repository.py, which is the API around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.backends.base import BlobStore
from storage.clock import SYSTEM, Clock
from storage.crypto import Codec
from storage.dedup_index import DedupIndex
from storage.image_folder import image_files, read_full
from storage.keys import index_key, manifest_key, pack_key
from storage.manifest import CHUNK_SIZE, DIGEST_SIZE, FileEntry, Manifest, new_checkpoint_id
from storage.pack_writer import PackWriter

_READ_BLOCK = 1024 * 1024
_PACKS_IN_FLIGHT = 2
_ZSTD_LEVEL = 1


@dataclass(frozen=True)
class Target:
    """Where a commit writes, and what it dedups against."""

    backend: BlobStore
    codec: Codec
    dedup: DedupIndex
    clock: Clock = SYSTEM  # names the checkpoint and its packs


def write_checkpoint(to: Target, workload: str, folder: Path, metadata: dict[str, Any]) -> Manifest:
    """Store the files under `folder` as a new checkpoint of `workload`: its packs (under the
    workload's prefix), then its manifest. Raises ReusedPacksGone (nothing committed) if a
    pack it would reuse is not in the store any more (storage/dedup_index.py)."""
    index = to.dedup.current(workload)
    created = to.clock.now()
    cid = new_checkpoint_id(created)
    writer = PackWriter(
        to.backend, to.codec, index, workload, _PACKS_IN_FLIGHT, _ZSTD_LEVEL, to.clock
    )
    used_packs: set[str] = set()
    files: list[FileEntry] = []
    size_bytes = total_chunks = 0
    buf = bytearray(_READ_BLOCK)
    try:
        for rel, path in image_files(folder):
            st = path.stat()
            digests = bytearray()
            with open(path, "rb", buffering=0) as f:
                while n := read_full(f, buf):
                    writer.between_blocks()
                    block = memoryview(buf)[:n]
                    block_digests = to.codec.chunk_ids(block, CHUNK_SIZE)
                    digests += block_digests
                    where = index.lookup(block_digests)
                    total_chunks += len(where)
                    used_packs.update(index.pack_id(p) for p in np.unique(where[where >= 0]))
                    new = np.flatnonzero(where < 0)
                    pages = n // CHUNK_SIZE  # the file's short last chunk goes alone
                    used_packs |= writer.pack_pages(block_digests, block, new[new < pages])
                    for i in new[new >= pages].tolist():
                        digest = block_digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                        chunk = block[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
                        used_packs.add(writer.pack_of(digest, chunk))
            size_bytes += st.st_size
            files.append(FileEntry(rel, st.st_size, st.st_mode & 0o777, digests))
        writer.finish()
    finally:
        writer.close()
    to.dedup.check_reused(workload, used_packs - writer.written)

    manifest = Manifest(
        id=cid,
        workload=workload,
        created=created,
        chunk_size=CHUNK_SIZE,
        files=files,
        packs=sorted(used_packs),
        metadata=metadata,
        size_bytes=size_bytes,
        new_bytes=writer.new_bytes,
        new_chunks=writer.new_chunks,
        total_chunks=total_chunks,
        scoped_packs=True,
    )
    key = manifest_key(workload, cid)
    to.backend.needs(
        key,
        [
            k
            for p in sorted(writer.written)
            for k in (pack_key(p, workload), index_key(p, workload))
        ],
    )
    # Sealed and written a piece at a time: the whole manifest is never in memory.
    to.backend.put_pieces(key, lambda: to.codec.seal_stream(key, manifest.pieces()))
    return manifest
