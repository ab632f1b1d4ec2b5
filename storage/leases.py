"""Leases: which host owns each workload, kept in the bucket with conditional writes.

A lease is one object per workload, `leases/<workload>`, sealed like every other object. It
names the holder, the generation and the state, and it is written only when ownership changes
hands or step: claim, prepare, hand-over, release, takeover (and a re-claim by its own holder,
see below). Never renewed: a lease is live while its holder's heartbeat is (storage/
heartbeats.py). It is only ever replaced with `put_if` (If-Match on the version read;
If-None-Match for the first one), so when two hosts race for it, the store lets exactly one of
them win, whatever their clocks say. Each new owner takes the next `generation`: the fencing
token that the workload's head records (storage/heads.py), so that a host that lost the lease
without knowing it commits nothing that exists.

Taking over a lease whose holder is dead. The watcher judged the holder dead from its
heartbeat's version (storage/heartbeats.py Liveness); `acquire` then reads the lease, then
asks whether the holder's heartbeat is *still* the version judged dead (`holder_dead`, which
reads it again), and only then writes, If-Match on the lease version it read. The holder, for
its part, lands a new heartbeat before any write of a lease it keeps (a re-claim after a
restart, or after a missed deadline: checkpointer/daemon/lease_watchdog.py). So a watcher that
read the lease after such a write finds the heartbeat changed and takes nothing, and one that
read it before has its If-Match refused by that write, or wins and the holder's write fails.

A bucket writer may put back an older sealed lease (it is authentic: it was ours once). Each
host remembers the newest generation (and whether it was given away) it saw per workload and
refuses a lease older than that (`LeaseReplayed`): it is never obeyed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import (
    BlobNotFound,
    CorruptCheckpoint,
    PreconditionFailed,
    StorageError,
)
from storage.keys import lease_key
from storage.lease_probe import PROBE as PROBE  # re-exported: doctor probes through here
from storage.lease_probe import probe_conditional_writes as probe_conditional_writes
from storage.manifest import check_workload_name

_MAX_BYTES = 16 * 1024


class LeaseState(StrEnum):
    """What the holder does with the workload."""

    HELD = "held"
    """The holder runs and checkpoints it."""
    PREPARING = "preparing"
    """The holder runs it and is about to hand it to `next_holder`, which fetches its newest
    checkpoint ahead, so that the migration waits only for what changed since."""
    HANDED = "handed"
    """Migrated: the previous holder stopped it; the holder named restores it and takes it."""
    RELEASED = "released"
    """Nobody runs it (unregistered): any host may take it."""


class LeaseHeld(StorageError):
    """Another host holds the lease."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(
            f"workload {lease.workload} is owned by host {lease.holder} "
            f"(lease generation {lease.generation}, {lease.state})"
        )
        self.lease = lease


class LeaseLost(StorageError):
    """Our lease was taken over or changed: we are no longer the owner."""


class LeaseReplayed(CorruptCheckpoint):
    """A lease older than one this host saw before: put back by someone who can write the
    bucket (it is authentic, it was valid once). Refused like a damaged one."""


@dataclass(frozen=True)
class Lease:
    workload: str
    holder: str
    generation: int
    state: LeaseState = LeaseState.HELD
    previous_holder: str | None = None
    next_holder: str | None = None  # PREPARING: the host it will be handed to
    written: float = 0.0  # the writer's wall clock: for people, never compared

    def order(self) -> tuple[int, int]:
        """Where this lease stands in its workload's history: a generation is held (and
        prepared) first, then handed over or released, never held again."""
        return self.generation, int(self.state in (LeaseState.HANDED, LeaseState.RELEASED))

    def to_json(self) -> bytes:
        return json.dumps({"version": 2, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, raw: bytes, workload: str) -> Lease:
        """Leases of the previous version (renewed, with `expires`, `ttl` and
        `newest_before`) read as well: those fields say nothing any more."""
        try:
            d = json.loads(raw)
            lease = cls(
                workload=str(d["workload"]),
                holder=str(d["holder"]),
                generation=int(d["generation"]),
                state=LeaseState(d["state"]),
                previous_holder=_host_or_none(d.get("previous_holder")),
                next_holder=_host_or_none(d.get("next_holder")),
                written=float(d.get("written", d.get("expires", 0.0))),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptCheckpoint(f"the lease of {workload} is unreadable ({e})") from e
        if lease.workload != workload:
            raise CorruptCheckpoint(f"the lease of {workload} names {lease.workload}")
        return lease


def _host_or_none(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"a host id is a string, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Held:
    """A lease as this host last wrote or read it, with the version to replace it by."""

    lease: Lease
    version: str


def _same_step(found: Lease, meant: Lease) -> bool:
    """Whether `found` is the lease `meant` by a write of this host (or, for a lease it keeps,
    one it wrote before in the same generation): same workload and generation, and either the
    same holder and state, or still held by the same host. Nobody else writes a lease with
    this host as holder in this generation: a takeover, and the next holder's acquire after a
    hand-over, both start a new generation."""
    if found.workload != meant.workload or found.generation != meant.generation:
        return False
    if found.holder == meant.holder and found.state is meant.state:
        return True
    keeps = (LeaseState.HELD, LeaseState.PREPARING)
    return found.holder == meant.holder and found.state in keeps and meant.state in keeps


class Leases:
    """The lease objects of one repository, read and written through its codec.

    `holder_dead(host)`: whether `host` is dead, asked (and its heartbeat read again) after
    the lease it holds was read and before it is taken (module docstring)."""

    def __init__(
        self,
        store: BlobStore,
        codec: Codec,
        host: str,
        clock: Callable[[], float] = time.time,
        holder_dead: Callable[[str], bool] = lambda host: False,
    ) -> None:
        self.store = store
        self.codec = codec
        self.host = host
        self.clock = clock
        self.holder_dead = holder_dead
        self._lock = threading.Lock()
        self._newest: dict[str, tuple[int, int]] = {}  # workload -> Lease.order() seen

    # -- reading -----------------------------------------------------------------------

    def read(self, workload: str) -> Held | None:
        """The lease as the bucket has it now; LeaseReplayed if it is older than one seen
        before."""
        key = lease_key(check_workload_name(workload))
        try:
            blob, version = self.store.get_versioned(key, _MAX_BYTES)
        except BlobNotFound:
            return None
        lease = Lease.from_json(self.codec.open(key, blob), workload)
        self._observe(lease)
        return Held(lease, version)

    def _observe(self, lease: Lease) -> None:
        with self._lock:
            newest = self._newest.get(lease.workload)
            if newest is not None and lease.order() < newest:
                raise LeaseReplayed(
                    f"the lease of {lease.workload} in the bucket is generation "
                    f"{lease.generation} ({lease.state}), older than generation {newest[0]} "
                    "seen before: put back by someone who can write the bucket; refused (check "
                    "who holds write access to it)"
                )
            self._newest[lease.workload] = lease.order()

    def newest_seen(self) -> dict[str, tuple[int, int]]:
        """Per workload, the newest lease this host saw or wrote (`Lease.order()`): what a
        host keeps across restarts so that a replay is refused after one too."""
        with self._lock:
            return dict(self._newest)

    def remember(self, newest: dict[str, tuple[int, int]]) -> None:
        """Take back what `newest_seen` returned before (a restart)."""
        with self._lock:
            for workload, order in newest.items():
                self._newest[workload] = max(order, self._newest.get(workload, (0, 0)))

    def held_by_dead(self, lease: Lease) -> bool:
        """Whether `lease` is held by another host that is dead (read again now): HELD or
        PREPARING by it, or HANDED to it."""
        if lease.holder == self.host or lease.state is LeaseState.RELEASED:
            return False
        return self.holder_dead(lease.holder)

    # -- writing -----------------------------------------------------------------------

    def _write(self, lease: Lease, version: str | None) -> Held:
        key = lease_key(lease.workload)
        new = self.store.put_if(key, self.codec.seal(key, lease.to_json()), version)
        with self._lock:  # what we wrote is the newest we know of
            self._newest[lease.workload] = max(
                lease.order(), self._newest.get(lease.workload, (0, 0))
            )
        return Held(lease, new)

    def acquire(self, workload: str) -> Held:
        """Take the lease if it is free (none yet, released, or handed to us), held by a host
        found dead, or ours already (then written again: a re-claim, in the same generation);
        raise LeaseHeld if another host holds it."""
        current = self.read(workload)
        if current is not None:
            lease = current.lease
            mine = lease.holder == self.host
            if mine and lease.state in (LeaseState.HELD, LeaseState.PREPARING):
                return self.reassert(current)
            free = lease.state is LeaseState.RELEASED or (lease.state is LeaseState.HANDED and mine)
            if not free and not self.held_by_dead(lease):
                raise LeaseHeld(lease)
        generation = current.lease.generation + 1 if current else 1
        lease = Lease(
            workload,
            self.host,
            generation,
            LeaseState.HELD,
            previous_holder=current.lease.holder if current else None,
            written=self.clock(),
        )
        try:
            return self._write(lease, current.version if current else None)
        except PreconditionFailed as e:
            won = self.read(workload)  # a retried write of ours may have landed already
            if won is not None and _same_step(won.lease, lease):
                return self.reassert(won)  # written again by this call: see _replace
            raise LeaseHeld(won.lease if won else lease) from e

    def reassert(self, held: Held) -> Held:
        """Write our lease again as it is, on the version we know: a re-claim, or keeping it
        after a missed deadline. LeaseLost if it was taken meanwhile (the conditional write
        is the check, and the fence against a watcher still holding an older judgement)."""
        return self._replace(held, replace(held.lease, written=self.clock()))

    def prepare(self, held: Held, to: str | None) -> Held:
        """Announce a hand-over to `to` (None: call it off); the holder keeps the lease."""
        state = LeaseState.PREPARING if to else LeaseState.HELD
        lease = replace(held.lease, state=state, next_holder=to, written=self.clock())
        return self._replace(held, lease)

    def hand_over(self, held: Held, to: str) -> Held:
        lease = replace(
            held.lease,
            holder=to,
            state=LeaseState.HANDED,
            previous_holder=self.host,
            next_holder=None,
            written=self.clock(),
        )
        return self._replace(held, lease)

    def release(self, held: Held) -> None:
        self._replace(held, replace(held.lease, state=LeaseState.RELEASED, written=self.clock()))

    def _replace(self, held: Held, lease: Lease) -> Held:
        """Write `lease` over the version of `held`. A write of ours may have landed with its
        reply lost (the caller then still has the older version): the lease found in its
        place is recognised as ours by holder, generation and state, never by exact equality
        (the bytes differ from one attempt to the next), so a retry after a lost reply does
        not fence this host off its own lease."""
        try:
            return self._write(lease, held.version)
        except PreconditionFailed as e:
            now = self.read(lease.workload)
            if now is not None and _same_step(now.lease, lease):
                if lease.state in (LeaseState.HANDED, LeaseState.RELEASED):
                    return now  # given away: the next holder may be writing it already
                # Still ours (an earlier write of ours landed): written again on the version
                # found, so that the lease's version in the store is one written by this
                # call, after whatever heartbeat the caller landed first.
                try:
                    return self._write(replace(lease, written=self.clock()), now.version)
                except PreconditionFailed:
                    now = self.read(lease.workload)
            raise LeaseLost(
                f"the lease of {lease.workload} changed under us"
                + (f": now held by {now.lease.holder}" if now else ": it is gone")
            ) from e
