"""A repository as versions before issue 27 wrote it: packs in the flat layout.

Before packs belonged to a workload, a commit stored its packs at `packs/<xx>/<id>.pack` (and
`.idx`) and wrote its manifest in format 2 with no `pack_layout`. `to_legacy_layout` turns a
workload's checkpoints, committed by this version, into exactly that: each pack and index
moved to its flat key (opened and sealed again under that name: every object is sealed under
its own key), each manifest written again in format 2. The packs' contents, the digests and
the manifests' ids stay what they were, as after a real upgrade.
"""

from __future__ import annotations

from storage import Repository
from storage.keys import index_key, manifest_key, pack_key
from storage.packs import MAX_INDEX_BYTES, MAX_PACK_BYTES


def to_legacy_layout(repo: Repository, workload: str) -> list[str]:
    """Rewrite every checkpoint of `workload` in the flat layout, through `repo`'s store (a
    store that writes through: not a spool); the checkpoint ids rewritten."""
    backend, codec = repo.backend, repo.codec
    ids = [n.id for n in repo.manifest_names() if n.workload == workload]
    manifests = [repo.read_manifest(workload, cid) for cid in ids]
    moved: set[str] = set()
    for m in manifests:
        assert m.pack_home == workload, "already in the legacy layout"
        for pid in sorted(set(m.packs) - moved):
            scoped, flat = pack_key(pid, workload), pack_key(pid, None)
            data = bytes(codec.open_pack(scoped, backend.get(scoped, MAX_PACK_BYTES)))
            backend.put_pieces(flat, lambda f=flat, d=data: codec.seal_pack(f, [d], len(d)))
            scoped_idx, flat_idx = index_key(pid, workload), index_key(pid, None)
            index = codec.open(scoped_idx, backend.get(scoped_idx, MAX_INDEX_BYTES))
            backend.put(flat_idx, codec.seal(flat_idx, index))
            backend.delete(scoped_idx)
            backend.delete(scoped)
            moved.add(pid)
    for m in manifests:
        m.scoped_packs = False  # written as format 2 was: no pack_layout
        key = manifest_key(workload, m.id)
        backend.delete(key)
        backend.put_pieces(key, lambda k=key, m=m: codec.seal_stream(k, m.pieces()))
    return ids
