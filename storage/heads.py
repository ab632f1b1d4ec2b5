"""Heads: the one object per workload that says which of its checkpoints exist (fleet mode).

`heads/<workload>` holds the owner's lease generation and the chain of committed checkpoint
ids, oldest first. It is only ever replaced with a conditional write on the version read
(If-Match; If-None-Match for the first), and a writer whose generation is older than the
head's is refused: storage-side fencing, as SlateDB and Delta Lake keep their manifests
(docs/fleet.md, R4). So a host that lost its lease without knowing it (partitioned, paused)
may still upload a manifest, but can never make it exist: what the head does not name is not
restored, rolled back to, or counted by retention, on any host, in any later generation.
"Newest" is the chain's order, never a sort by the writer's wall clock.

A new owner first `bump`s the head to its generation (after winning the lease): from then on
every write of an older generation fails. A commit appends its id after its manifest is in
the store, and retention drops ids in that same write (storage/fencing.py): what the head
drops it remembers in `dropped` until the owner's hourly job has deleted those manifests, no
sooner than the grace period after the drop, so that a reader who read the head just before
still finds what it names, and a pin or a drill's mark that came meanwhile can bring the
checkpoint back (a stray, a manifest the head never named, is never brought back).

The head is read back as hostile input: sealed with the repository's codec (authenticated in
an encrypted repository), parsed strictly, and a head older than one this process already
saw (a lower generation or serial: a bucket writer replaying an old object) is refused.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobNotFound, CorruptCheckpoint, PreconditionFailed, StorageError
from storage.keys import head_key
from storage.manifest import check_workload_name, is_checkpoint_id

Initial = Callable[[], tuple[str, ...]]  # the chain of a workload that has no head yet
MAX_HEAD_BYTES = 256 * 1024  # ~7,000 ids: far more than any retention keeps
_CAS_ATTEMPTS = 8


class _Regressed(Exception):
    """A head older than one this process saw (raised as CorruptCheckpoint if it stays)."""


class Fenced(StorageError):
    """This host's generation is older than the head's: another host owns the workload now."""


@dataclass(frozen=True)
class Head:
    workload: str
    generation: int
    chain: tuple[str, ...] = ()  # committed checkpoint ids, oldest first
    serial: int = 0  # +1 on every write: a replayed older head is told apart
    dropped: tuple[str, ...] = ()  # dropped from the chain, manifests not deleted yet

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": 1,
                "workload": self.workload,
                "generation": self.generation,
                "serial": self.serial,
                "chain": list(self.chain),
                "dropped": list(self.dropped),
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, workload: str) -> Head:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("version") != 1:
                raise ValueError("not a version 1 head")
            chain, dropped = d["chain"], d.get("dropped", [])  # a head of before drops: none
            for what, ids in (("chain", chain), ("dropped", dropped)):
                if not isinstance(ids, list) or not all(
                    isinstance(c, str) and is_checkpoint_id(c) for c in ids
                ):
                    raise ValueError(f"its {what} is not a list of checkpoint ids")
            head = cls(
                str(d["workload"]),
                int(d["generation"]),
                tuple(chain),
                int(d["serial"]),
                tuple(dropped),
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            raise CorruptCheckpoint(f"the head of {workload} is unreadable ({e})") from e
        if head.workload != workload:
            raise CorruptCheckpoint(f"the head of {workload} names {head.workload}")
        if len(set(head.chain)) != len(head.chain):
            raise CorruptCheckpoint(f"the head of {workload} names a checkpoint twice")
        if set(head.chain) & set(head.dropped):
            raise CorruptCheckpoint(f"the head of {workload} names a dropped checkpoint")
        return head


class Heads:
    """The heads of one repository, read and written through its codec, on the store that
    holds the truth (never a spool's cache)."""

    def __init__(self, store: BlobStore, codec: Codec) -> None:
        self.store = store
        self.codec = codec
        self._seen: dict[str, tuple[int, int]] = {}  # workload -> (generation, serial)
        self._last: dict[str, Head] = {}  # the newest head read or written, by workload
        self._lock = threading.Lock()

    def cached(self, workload: str) -> Head | None:
        """The newest head this process read or wrote of `workload`, without asking the
        store: possibly stale (another host may have written since), so good only for a
        decision that a conditional write then checks (retention's)."""
        with self._lock:
            return self._last.get(workload)

    def forget(self, keep: set[str]) -> None:
        """Hold the heads of these workloads only (this host's own)."""
        with self._lock:
            for w in [w for w in self._last if w not in keep]:
                del self._last[w]

    def read(self, workload: str) -> tuple[Head, str] | None:
        """The head and its version, None if the workload has none yet."""
        try:
            return self._read(workload)
        except _Regressed:
            # Another thread of ours may have read (or written) a newer head while this read
            # was on its way: ask again before calling it a replay.
            try:
                return self._read(workload)
            except _Regressed as e:
                raise CorruptCheckpoint(str(e)) from None

    def _read(self, workload: str) -> tuple[Head, str] | None:
        key = head_key(check_workload_name(workload))
        try:
            blob, version = self.store.get_versioned(key, MAX_HEAD_BYTES)
        except BlobNotFound:
            return None
        head = Head.from_json(self.codec.open(key, blob), workload)
        with self._lock:
            seen = self._seen.get(workload, (0, 0))
            if (head.generation, head.serial) < seen:
                raise _Regressed(
                    f"the head of {workload} went back to generation {head.generation} "
                    f"(serial {head.serial}) after {seen[0]} ({seen[1]}) was seen: an old copy "
                    "was written back (a bucket writer replaying it?); refused"
                )
            self._seen[workload] = (head.generation, head.serial)
            self._last[workload] = head
        return head, version

    def bump(self, workload: str, generation: int, initial: Initial = tuple) -> Head:
        """Make `generation` the head's (a new owner, once it holds the lease): writers of
        older generations are refused from now on. `initial`: the chain of a workload that
        has no head yet (its checkpoints from before heads existed, oldest first)."""
        return self.update(workload, generation, lambda h: h, initial)

    def append(
        self, workload: str, checkpoint_id: str, generation: int, initial: Initial = tuple
    ) -> Head:
        """Name a checkpoint whose manifest is in the store (its commit point)."""

        def add(h: Head) -> Head:
            if checkpoint_id in h.chain:
                return h  # our own write, landed with its reply lost
            return replace(h, chain=(*h.chain, checkpoint_id))

        return self.update(workload, generation, add, initial)

    def remove(
        self, workload: str, ids: set[str], generation: int, initial: Initial = tuple
    ) -> Head:
        """Stop naming checkpoints (retention), before their manifests are deleted."""

        def drop(h: Head) -> Head:
            return replace(
                h,
                chain=tuple(c for c in h.chain if c not in ids),
                dropped=tuple(d for d in h.dropped if d not in ids),
            )

        return self.update(workload, generation, drop, initial)

    def update(
        self,
        workload: str,
        generation: int,
        change: Callable[[Head], Head],
        initial: Initial,
    ) -> Head:
        """Replace the head by `change(head)`, read and written again until no other write
        came between (If-Match): `change` may be called several times, on fresh heads."""
        key = head_key(check_workload_name(workload))
        for _ in range(_CAS_ATTEMPTS):
            current = self.read(workload)
            if current is None:
                base, version = Head(workload, generation, tuple(initial())), None
            else:
                base, version = current
            if base.generation > generation:
                raise Fenced(
                    f"workload {workload} is at lease generation {base.generation} in the "
                    f"bucket, this host acts under {generation}: another host took it over; "
                    "nothing this host commits or removes for it counts any more"
                )
            new = change(replace(base, generation=generation))
            if current is not None and new == base:
                return base  # nothing to change (or our own write, landed with its reply lost)
            new = replace(new, serial=base.serial + 1)
            try:
                self.store.put_if(key, self.codec.seal(key, new.to_json()), version)
            except PreconditionFailed:
                continue  # changed meanwhile (or our write landed, reply lost): read again
            with self._lock:
                if (new.generation, new.serial) >= self._seen.get(workload, (0, 0)):
                    self._seen[workload] = (new.generation, new.serial)
                    self._last[workload] = new
            return new
        raise StorageError(
            f"the head of {workload} kept changing under {_CAS_ATTEMPTS} writes; try again"
        )
