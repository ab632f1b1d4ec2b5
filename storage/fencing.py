"""A repository's fenced mode (fleet): the heads say which checkpoints exist, and every commit
or removal is a conditional write of the head under this host's lease generation.

What the repository does with it (docs/fleet.md, R4):
- `fence(w, g)`: this host now owns w under generation g; the head is bumped to g at once, so
  that a former owner's commits are refused from this moment on, not from our first commit.
- a commit names its checkpoint in the head only once its manifest is in the store: a record
  queued behind the uploads (`BlobStore.after_uploads`), applied here, in order, after a
  daemon restart too. A record refused by the head (`Fenced`) leaves a manifest that does
  not exist for anyone; it is logged, not retried.
- the checkpoints of w are the head's chain (oldest first), plus this host's own commits
  still on their way; a workload without a head yet (checkpoints from before heads) is
  listed as before, and its first head starts with that listing.
- retention removes ids from the head first (fenced), then deletes their manifests; a
  checkpoint not uploaded yet is not removed (its head record is still queued).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from storage.backends.base import BlobStore
from storage.errors import (
    CheckpointNotFound,
    StorageAccessError,
    StorageError,
    TransientStorageError,
)
from storage.heads import Fenced, Heads
from storage.keys import manifest_key

log = logging.getLogger(__name__)
Listing = Callable[[str], list[str]]  # workload -> checkpoint ids listed in the store, any order


class NotFenced(StorageError):
    """This host holds no generation for the workload: it does not own it."""


class Fencing:
    def __init__(self, heads: Heads, backend: BlobStore, listed: Listing) -> None:
        self.heads = heads
        self.backend = backend
        self.listed = listed
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()
        backend.handle_records(self.apply)

    def fence(self, workload: str, generation: int) -> None:
        self.heads.bump(workload, generation, lambda: self._legacy(workload))
        with self._lock:
            self._generations[workload] = generation

    def generation(self, workload: str, given: int | None = None) -> int:
        if given is not None:
            return given
        with self._lock:
            g = self._generations.get(workload)
        if g is None:
            raise NotFenced(
                f"this host holds no lease generation for {workload}: in fleet mode only its "
                "owner commits or removes its checkpoints"
            )
        return g

    def committed(self, workload: str, checkpoint_id: str, generation: int) -> None:
        """The manifest is written (perhaps still queued): name it in the head after it."""
        with self._lock:  # the lease's generation, also when it was claimed without `fence`
            self._generations[workload] = max(generation, self._generations.get(workload, 0))
        self.backend.after_uploads(f"+ {workload} {checkpoint_id} {generation}")

    def apply(self, record: str) -> None:
        op, workload, checkpoint_id, generation = record.split(" ")
        if op != "+":
            log.error("unknown head record %r ignored", record)
            return
        # This host's own pending delete of it counts (a removal queued behind this record).
        if not self.backend.exists(manifest_key(workload, checkpoint_id)):
            log.error(
                "checkpoint %s of %s never reached the store (dropped from the spool): "
                "not committed",
                checkpoint_id,
                workload,
            )
            return
        try:
            self.heads.append(
                workload, checkpoint_id, int(generation), lambda: self._legacy(workload)
            )
        except Fenced as e:
            log.error("checkpoint %s of %s is not committed: %s", checkpoint_id, workload, e)
        except (TransientStorageError, StorageAccessError):
            raise  # the uploader tries again later
        except StorageError as e:  # a head that does not open: never retried for ever
            log.error("checkpoint %s of %s is not committed: %s", checkpoint_id, workload, e)

    def ids(self, workload: str) -> list[str]:
        """The committed checkpoints, oldest first, as the head says (the store's truth: an
        outage raises), with this host's commits still queued after them."""
        got = self.heads.read(workload)
        chain = list(got[0].chain) if got is not None else list(self._legacy(workload))
        floor = got[0].generation if got is not None else 0
        for record in self.backend.pending_records():
            op, w, checkpoint_id, generation = record.split(" ")
            # Only a record the head will take: one of an older generation is refused there.
            take = op == "+" and w == workload and int(generation) >= floor
            if take and checkpoint_id not in chain:
                chain.append(checkpoint_id)
        return chain

    def require(self, workload: str, checkpoint_id: str) -> None:
        if checkpoint_id not in self.ids(workload):
            raise CheckpointNotFound(
                f"checkpoint {checkpoint_id} of {workload} is not committed: the workload's "
                "head does not name it (taken by a host that had lost the workload, or "
                f"removed by retention); see `checkpointer list {workload}`"
            )

    def remove(self, workload: str, checkpoint_id: str) -> None:
        """Before the manifest is deleted: the head stops naming it (Fenced if we lost it)."""
        queued = any(
            r.split(" ")[1:3] == [workload, checkpoint_id] for r in self.backend.pending_records()
        )
        if queued or self.backend.is_pending(manifest_key(workload, checkpoint_id)):
            raise StorageError(
                f"checkpoint {checkpoint_id} of {workload} is not uploaded yet: it is removed "
                "once it is"
            )
        self.heads.remove(
            workload, {checkpoint_id}, self.generation(workload), lambda: self._legacy(workload)
        )

    def strays(self, workload: str, grace: float) -> list[str]:
        """Manifests in the store that the head does not name, stored more than `grace` ago:
        commits of a host that had lost the workload (or a head write that never came).
        They do not exist for anyone; the owner deletes them so that GC can free their packs.
        None while the workload has no head (its listing is still the truth then)."""
        self.generation(workload)  # NotFenced unless this host owns it
        got = self.heads.read(workload)
        if got is None:
            return []
        named = set(self.ids(workload))
        cutoff = time.time() - grace
        out = []
        for checkpoint_id in sorted(set(self.listed(workload)) - named):
            stored = self.backend.modified(manifest_key(workload, checkpoint_id))
            if stored is not None and stored < cutoff:
                out.append(checkpoint_id)
        return out

    def remove_strays(self, workload: str, grace: float) -> list[str]:
        """Delete the manifests `strays` finds; their ids."""
        gone = self.strays(workload, grace)
        for checkpoint_id in gone:
            self.backend.delete(manifest_key(workload, checkpoint_id))
        return gone

    def _legacy(self, workload: str) -> tuple[str, ...]:
        return tuple(sorted(self.listed(workload)))
