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
- retention drops ids from the head in the same conditional write that names a new
  checkpoint (a planner the engine registers, `plan_with`), so a commit reads the head once
  and writes it once; `retire` drops them at once (prune, the first commit of a process). A
  checkpoint not uploaded yet is not removed (its head record is still queued).
- the manifests the head dropped (its `dropped` list) and the strays (manifests it never
  named: a stale owner's) are deleted by the owner's hourly job (`tidy`), never sooner than
  the grace period after this process first saw them unnamed (its monotonic clock: a
  restart only waits longer), after it listed pins and drill marks afresh: a dropped
  checkpoint pinned meanwhile, or the newest verified one, is named again instead. So a
  reader who read the head (and pins) within the grace still finds what they named, and a
  stale view of pins or marks in retention costs at most a late keep, never a deletion.
  A checkpoint named again starts a new grace when it is dropped again. The head remembers a
  dropped id until its manifest is deleted, never less (a forgotten one would be deleted as
  a stray, even pinned); bounded by MAX_DROPPED: a full list drops nothing more, retention
  waits (the head still names them) until the owner's job deleted some.
- what this process knows of a workload (grace times, its planner) is forgotten when it
  loses or gives up the lease (`disown`), and the grace times when it fences a new
  generation: another owner may have named, dropped or deleted anything meanwhile. `tidy`
  deletes nothing once the head is at a newer generation than ours (Fenced).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from storage.backends.base import BlobStore
from storage.clock import SYSTEM, Clock
from storage.errors import (
    CheckpointNotFound,
    StorageAccessError,
    StorageError,
    TransientStorageError,
)
from storage.heads import Fenced, Head, Heads
from storage.keys import manifest_key

log = logging.getLogger(__name__)
Listing = Callable[[str], list[str]]  # workload -> checkpoint ids listed in the store, any order
Planner = Callable[[tuple[str, ...]], set[str]]  # a chain, oldest first -> the ids to drop
Rescue = Callable[[set[str]], set[str]]  # dropped ids not deleted yet -> those to name again
Delete = Callable[[set[str], set[str]], None]  # (ids to delete, ids whose manifests remain)
# Dropped ids a head remembers, not deleted yet (~150 KB of the head's 256 KB): 11 h of drops
# at one every 10 s, the default 6 h grace plus five missed hourly jobs. In the steady state a
# head holds the drops of the grace plus one hour (~2,500 then).
MAX_DROPPED = 4000


class NotFenced(StorageError):
    """This host holds no generation for the workload: it does not own it."""


@dataclass
class Tidied:
    """What the owner's job did to one workload's manifests."""

    deleted: list[str] = field(default_factory=list)  # dropped or stray, past the grace
    rescued: list[str] = field(default_factory=list)  # dropped, named again (pinned, verified)
    waiting: int = 0  # unnamed, within the grace


class Fencing:
    def __init__(
        self, heads: Heads, backend: BlobStore, listed: Listing, clock: Clock = SYSTEM
    ) -> None:
        self.heads = heads
        self.backend = backend
        self.listed = listed
        self.clock = clock
        self._generations: dict[str, int] = {}
        self._planners: dict[str, Planner] = {}
        # Unnamed manifests (dropped or stray): when this process first saw them so.
        self._since: dict[tuple[str, str], float] = {}
        # Dropped ids whose manifests are deleted: the next head write forgets them.
        self._deleted: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # the record applied in the committing thread
        backend.handle_records(self.apply)

    def fence(self, workload: str, generation: int) -> None:
        self.heads.bump(workload, generation, lambda: self._legacy(workload))
        with self._lock:
            self._own(workload, generation)

    def _own(self, workload: str, generation: int) -> None:
        """Under the lock: a generation other than the one held means another host may have
        owned `workload` meanwhile, so the grace times seen before are stale: they go (a
        grace only starts later, never sooner)."""
        if self._generations.get(workload) != generation:
            self._forget_grace(workload)
        self._generations[workload] = generation

    def _forget_grace(self, workload: str) -> None:
        for k in [k for k in self._since if k[0] == workload]:
            del self._since[k]
        self._deleted.pop(workload, None)

    def disown(self, workload: str) -> None:
        """This host lost or gave up the lease of `workload`: its generation, planner and
        grace times go (NotFenced from now on, until it fences a generation again)."""
        with self._lock:
            self._generations.pop(workload, None)
            self._planners.pop(workload, None)
            self._forget_grace(workload)

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

    def plan_with(self, workload: str, planner: Planner | None) -> None:
        """Retention of `workload` (None: none): the ids a head write that names a new
        checkpoint drops in the same write, decided on the head just read."""
        with self._lock:
            if planner is None:
                self._planners.pop(workload, None)
            else:
                self._planners[workload] = planner

    def keep_only(self, keep: set[str]) -> None:
        """Planners and memories of these workloads only (this host's own)."""
        with self._lock:
            for w in [w for w in self._planners if w not in keep]:
                del self._planners[w]
            for k in [k for k in self._since if k[0] not in keep]:
                del self._since[k]
        self.heads.forget(keep)

    def planned(self, workload: str) -> bool:
        """Whether a queued head record of `workload` will apply its retention."""
        with self._lock:
            if workload not in self._planners:
                return False
        return any(r.split(" ")[1] == workload for r in self.backend.pending_records())

    def committed(self, workload: str, checkpoint_id: str, generation: int) -> None:
        """The manifest is written (perhaps still queued): name it in the head after it."""
        with self._lock:  # the lease's generation, also when it was claimed without `fence`
            if generation > self._generations.get(workload, 0):
                self._own(workload, generation)
        self._local.direct = (workload, checkpoint_id)
        try:
            self.backend.after_uploads(f"+ {workload} {checkpoint_id} {generation}")
        finally:
            self._local.direct = None

    def apply(self, record: str) -> None:
        op, workload, checkpoint_id, generation = record.split(" ")
        if op != "+":
            log.error("unknown head record %r ignored", record)
            return
        # Applied in the committing thread: the store wrote the manifest through, just now.
        # Else (a spool's uploader) this host's own pending delete of it counts.
        direct = getattr(self._local, "direct", None) == (workload, checkpoint_id)
        if not direct and not self.backend.exists(manifest_key(workload, checkpoint_id)):
            log.error(
                "checkpoint %s of %s never reached the store (dropped from the spool): "
                "not committed",
                checkpoint_id,
                workload,
            )
            return
        dropped: set[str] = set()

        def add(h: Head) -> Head:
            chain = h.chain if checkpoint_id in h.chain else (*h.chain, checkpoint_id)
            plan = self._plan(workload, chain) - {checkpoint_id}
            new, gone = self._drop(workload, replace(h, chain=chain), plan)
            dropped.clear()
            dropped.update(gone)
            return new

        try:
            self.heads.update(workload, int(generation), add, lambda: self._legacy(workload))
        except Fenced as e:
            log.error("checkpoint %s of %s is not committed: %s", checkpoint_id, workload, e)
            return
        except (TransientStorageError, StorageAccessError):
            raise  # the uploader tries again later
        except StorageError as e:  # a head that does not open: never retried for ever
            log.error("checkpoint %s of %s is not committed: %s", checkpoint_id, workload, e)
            return
        self._dropped(workload, dropped)

    def _plan(self, workload: str, chain: tuple[str, ...]) -> set[str]:
        with self._lock:
            planner = self._planners.get(workload)
        if planner is None:
            return set()
        try:
            return planner(chain) & set(chain)
        except Exception:  # retention waits for the next commit; the commit stands
            log.exception("retention of %s failed; it is tried again at the next commit", workload)
            return set()

    def _drop(self, workload: str, h: Head, ids: set[str]) -> tuple[Head, set[str]]:
        """`h` without `ids` in its chain, remembering them as dropped, and forgetting the
        dropped ones whose manifests are deleted (only those: one forgotten sooner would be
        deleted as a stray, even pinned); with the ids it dropped. A full list (MAX_DROPPED)
        drops the oldest that fit, the rest stay named: retention drops them at a later write."""
        with self._lock:
            deleted = set(self._deleted.get(workload, ()))
        dropped = [d for d in h.dropped if d not in deleted and d not in h.chain]
        gone = set(sorted(ids & set(h.chain) - set(dropped))[: max(0, MAX_DROPPED - len(dropped))])
        if gone != ids & set(h.chain):
            log.error(
                "the head of %s remembers %d dropped checkpoints not deleted yet: %d more stay "
                "until the owner's job deletes some (is it failing?)",
                workload,
                len(dropped),
                len(ids & set(h.chain) - gone),
            )
        kept = tuple(c for c in h.chain if c not in gone)
        return replace(h, chain=kept, dropped=(*dropped, *sorted(gone))), gone

    def _dropped(self, workload: str, ids: set[str]) -> None:
        """After a head write that dropped `ids` from its chain: their grace starts now, also
        for one dropped before and named again since (its earlier grace counts no more)."""
        now = self.clock.monotonic()
        with self._lock:
            for c in ids:
                self._since[(workload, c)] = now
            self._deleted.pop(workload, None)

    def ids(self, workload: str) -> list[str]:
        """The committed checkpoints, oldest first, as the head says (the store's truth: an
        outage raises), with this host's commits still queued after them."""
        got = self.heads.read(workload)
        return self._with_pending(workload, got[0] if got is not None else None)

    def view(self, workload: str) -> list[str]:
        """`ids` from the head this process last read or wrote (no request once it has
        one): retention decides on it, and the conditional write that drops checks it."""
        head = self.heads.cached(workload)
        if head is None:
            return self.ids(workload)
        return self._with_pending(workload, head)

    def _with_pending(self, workload: str, head: Head | None) -> list[str]:
        chain = list(head.chain) if head is not None else list(self._legacy(workload))
        floor = head.generation if head is not None else 0
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

    def _not_queued(self, workload: str, checkpoint_id: str) -> None:
        queued = any(
            r.split(" ")[1:3] == [workload, checkpoint_id] for r in self.backend.pending_records()
        )
        if queued or self.backend.is_pending(manifest_key(workload, checkpoint_id)):
            raise StorageError(
                f"checkpoint {checkpoint_id} of {workload} is not uploaded yet: it is removed "
                "once it is"
            )

    def remove(self, workload: str, checkpoint_id: str) -> None:
        """Before the manifest is deleted: the head stops naming it (Fenced if we lost it)."""
        self._not_queued(workload, checkpoint_id)
        self.heads.remove(
            workload, {checkpoint_id}, self.generation(workload), lambda: self._legacy(workload)
        )

    def retire(self, workload: str, ids: set[str]) -> None:
        """Retention now (not with a commit's head write): the head drops `ids`; their
        manifests go in the owner's job, after the grace (`tidy`)."""
        for checkpoint_id in ids:
            self._not_queued(workload, checkpoint_id)
        dropped: set[str] = set()

        def drop(h: Head) -> Head:
            new, gone = self._drop(workload, h, ids)
            dropped.clear()
            dropped.update(gone)
            return new

        self.heads.update(workload, self.generation(workload), drop, lambda: self._legacy(workload))
        self._dropped(workload, dropped)

    def tidy(self, workload: str, grace: float, rescue: Rescue, delete: Delete) -> Tidied:
        """The owner's job: delete the manifests the head does not name (dropped by
        retention, or strays: a stale owner's commits) once this process has seen them
        unnamed for `grace`; name again the dropped ones `rescue` says to keep (pinned or
        verified since: the caller listed pins and marks just before). Nothing while the
        workload has no head (its listing is still the truth then)."""
        generation = self.generation(workload)  # NotFenced unless this host owns it
        got = self.heads.read(workload)
        if got is None:
            return Tidied()
        if got[0].generation > generation:  # not ours any more: our grace times are stale
            raise Fenced(
                f"workload {workload} is at lease generation {got[0].generation} in the "
                f"bucket, this host acts under {generation}: its owner now deletes its "
                "checkpoints, not this host"
            )
        listed = set(self.listed(workload))
        unnamed = listed - set(self._with_pending(workload, got[0]))
        dropped = set(got[0].dropped)
        out = Tidied()
        back = rescue(unnamed & dropped)
        if back:
            self.heads.update(
                workload, generation, lambda h: _name_again(h, back), lambda: self._legacy(workload)
            )
            out.rescued = sorted(back)
        now = self.clock.monotonic()
        with self._lock:
            # Named again (here, or by a former owner): a new grace when dropped again.
            for k in [k for k in self._since if k[0] == workload and k[1] not in unnamed - back]:
                del self._since[k]
            since = {c: self._since.setdefault((workload, c), now) for c in unnamed - back}
        due = {c for c, t in since.items() if now - t >= grace}
        out.waiting = len(since) - len(due)
        if due:
            delete(due, listed - due)
            out.deleted = sorted(due)
        with self._lock:
            for c in due:
                self._since.pop((workload, c), None)
            # Forgotten by the next head write (a commit's): nothing to write for it now.
            self._deleted.setdefault(workload, set()).update((dropped - listed) | (due & dropped))
        return out

    def _legacy(self, workload: str) -> tuple[str, ...]:
        return tuple(sorted(self.listed(workload)))


def _name_again(h: Head, ids: set[str]) -> Head:
    """`h` naming the dropped `ids` again, each where its id (its creation time) puts it."""
    chain = list(h.chain)
    for r in sorted(ids & set(h.dropped)):
        chain.insert(next((i for i, c in enumerate(chain) if c > r), len(chain)), r)
    return replace(h, chain=tuple(chain), dropped=tuple(d for d in h.dropped if d not in ids))
