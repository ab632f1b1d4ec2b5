"""Leases: which host owns each workload, kept in the bucket with conditional writes.

A lease is one object per workload, `leases/<workload>`, sealed like every other object. It
is only ever replaced with `put_if` (If-Match on the version read; If-None-Match for the first
one), so when two hosts race for it, the store lets exactly one of them win, whatever their
clocks say. Each new owner takes the next `generation`: the fencing token that checkpoints
record, so that a checkpoint committed by a host that lost the lease without knowing it (it
was partitioned or paused) is never restored by the new owner (`may_restore`).

Expiry never compares two hosts' clocks (the DynamoDB lock client's rule). Another host treats
a lease as expired only once it has seen the same version of it, unchanged, for TTL + skew on
its own monotonic clock, counted from the end of the read that first showed that version
(`Leases.expired`). The holder stops acting on it at TTL - skew after it *sent* the write that
made that version (checkpointer/daemon/fleet.py): the version cannot have landed, nor been
seen, before it was sent, so the holder stops at least 2 x skew before anyone may take over,
whatever the wall clocks say; `skew` here only has to cover the monotonic clocks' difference
in rate and the time a read takes to return. `expires` (wall clock) is kept for people.

A bucket writer may put back an older sealed lease (it is authentic: it was ours once). Each
host remembers the newest generation (and whether it was given away) it saw per workload and
refuses a lease older than that (`LeaseReplayed`): it is never obeyed.

Hosts also keep a heartbeat object, `hosts/<host id>`, replaced the same way: `live_hosts`.
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
from storage.keys import HOSTS, LEASES, FileType, host_key, lease_key, parse_as
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
    expires: float
    state: LeaseState = LeaseState.HELD
    previous_holder: str | None = None
    newest_before: str | None = None  # the newest checkpoint when this generation began
    next_holder: str | None = None  # PREPARING: the host it will be handed to
    ttl: float | None = None  # the holder's TTL (older leases: None, the reader's own)

    def order(self) -> tuple[int, int]:
        """Where this lease stands in its workload's history: a generation is held (and
        prepared) first, then handed over or released, never held again."""
        return self.generation, int(self.state in (LeaseState.HANDED, LeaseState.RELEASED))

    def to_json(self) -> bytes:
        return json.dumps({"version": 1, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, raw: bytes, workload: str) -> Lease:
        try:
            d = json.loads(raw)
            lease = cls(
                workload=str(d["workload"]),
                holder=str(d["holder"]),
                generation=int(d["generation"]),
                expires=float(d["expires"]),
                state=LeaseState(d["state"]),
                previous_holder=d.get("previous_holder"),
                newest_before=d.get("newest_before"),
                next_holder=d.get("next_holder"),
                ttl=float(d["ttl"]) if d.get("ttl") is not None else None,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(f"the lease of {workload} is unreadable ({e})") from e
        if lease.workload != workload:
            raise CorruptCheckpoint(f"the lease of {workload} names {lease.workload}")
        return lease


@dataclass(frozen=True)
class Held:
    """A lease as this host last wrote or read it, with the version to replace it by."""

    lease: Lease
    version: str


def may_restore(lease: Lease, checkpoint_id: str, generation: int | None) -> bool:
    """Whether the owner under `lease` may restore this checkpoint: one taken under its own
    generation, or one that existed when that generation began. A checkpoint an older owner
    committed after losing the lease is neither."""
    if generation == lease.generation:
        return True
    if generation is not None and generation > lease.generation:
        return False
    return lease.newest_before is not None and checkpoint_id <= lease.newest_before


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
    """The lease objects of one repository, read and written through its codec."""

    def __init__(
        self,
        store: BlobStore,
        codec: Codec,
        host: str,
        ttl: float = 30.0,
        skew: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.codec = codec
        self.host = host
        self.ttl = ttl
        self.skew = skew
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.Lock()  # the scan, renewals and the engine all read
        self._first_seen: dict[str, tuple[str, float]] = {}  # workload -> (version, when)
        self._newest: dict[str, tuple[int, int]] = {}  # workload -> Lease.order() seen

    # -- reading -----------------------------------------------------------------------

    def read(self, workload: str) -> Held | None:
        """The lease as the bucket has it now; LeaseReplayed if it is older than one seen
        before. Every read counts as an observation for `expired`."""
        key = lease_key(check_workload_name(workload))
        try:
            blob, version = self.store.get_versioned(key, _MAX_BYTES)
        except BlobNotFound:
            return None
        lease = Lease.from_json(self.codec.open(key, blob), workload)
        self._observe(lease, version)
        return Held(lease, version)

    def _observe(self, lease: Lease, version: str) -> None:
        now = self.monotonic()  # after the read returned: the version was there by then
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
            seen = self._first_seen.get(lease.workload)
            if seen is None or seen[0] != version:
                self._first_seen[lease.workload] = (version, now)

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

    def expired(self, held: Held) -> bool:
        """Whether this host has seen `held` unchanged (same version) for the holder's TTL +
        skew on its own monotonic clock. Never by comparing its wall clock with the
        holder's: a lease first seen now is not expired, however old its `expires`."""
        if held.lease.state is LeaseState.RELEASED:
            return False  # free, not expired: nobody runs it
        with self._lock:
            seen = self._first_seen.get(held.lease.workload)
        if seen is None or seen[0] != held.version:
            return False
        ttl = max(self.ttl, held.lease.ttl or 0.0)
        return self.monotonic() - seen[1] > ttl + self.skew

    def all(self) -> list[Held]:
        out = []
        for key in self.store.list(LEASES):
            name = parse_as(key, FileType.LEASE)
            if name is None:
                continue
            try:
                held = self.read(name.workload)
            except CorruptCheckpoint:
                continue  # planted or damaged: it leases nothing
            if held is not None:
                out.append(held)
        return out

    # -- writing -----------------------------------------------------------------------

    def _write(self, lease: Lease, version: str | None) -> Held:
        key = lease_key(lease.workload)
        new = self.store.put_if(key, self.codec.seal(key, lease.to_json()), version)
        with self._lock:  # what we wrote is the newest we know of
            self._newest[lease.workload] = max(
                lease.order(), self._newest.get(lease.workload, (0, 0))
            )
        return Held(lease, new)

    def acquire(self, workload: str, newest: str | None, taking_over: bool = False) -> Held:
        """Take the lease if it is free (none yet, released, expired, or handed to us) or
        already ours; raise LeaseHeld if another host holds it. `newest` is the newest
        checkpoint now: what this generation may restore besides its own."""
        current = self.read(workload)
        if current is not None:
            lease = current.lease
            mine = lease.holder == self.host
            expired = self.expired(current)
            free = (
                lease.state is LeaseState.RELEASED
                or expired
                or (lease.state is LeaseState.HANDED and mine)
            )
            if mine and lease.state in (LeaseState.HELD, LeaseState.PREPARING):
                return self.renew(current)
            if not free:
                raise LeaseHeld(lease)
            if taking_over and not expired:
                raise LeaseHeld(lease)
        generation = current.lease.generation + 1 if current else 1
        lease = Lease(
            workload,
            self.host,
            generation,
            self.clock() + self.ttl,
            LeaseState.HELD,
            previous_holder=current.lease.holder if current else None,
            newest_before=newest,
            ttl=self.ttl,
        )
        try:
            return self._write(lease, current.version if current else None)
        except PreconditionFailed as e:
            won = self.read(workload)  # a retried write of ours may have landed already
            if won is not None and _same_step(won.lease, lease):
                return self.renew(won)  # written again by this call: see _replace
            raise LeaseHeld(won.lease if won else lease) from e

    def renew(self, held: Held) -> Held:
        lease = replace(held.lease, expires=self.clock() + self.ttl, ttl=self.ttl)
        return self._replace(held, lease)

    def prepare(self, held: Held, to: str | None) -> Held:
        """Announce a hand-over to `to` (None: call it off); the holder keeps the lease."""
        state = LeaseState.PREPARING if to else LeaseState.HELD
        lease = replace(held.lease, state=state, next_holder=to, expires=self.clock() + self.ttl)
        return self._replace(held, lease)

    def hand_over(self, held: Held, to: str) -> Held:
        lease = replace(
            held.lease,
            holder=to,
            state=LeaseState.HANDED,
            previous_holder=self.host,
            next_holder=None,
            expires=self.clock() + self.ttl,
        )
        return self._replace(held, lease)

    def release(self, held: Held) -> None:
        self._replace(held, replace(held.lease, state=LeaseState.RELEASED))

    def _replace(self, held: Held, lease: Lease) -> Held:
        """Write `lease` over the version of `held`. A write of ours may have landed with its
        reply lost (the caller then still has the older version): the lease found in its
        place is recognised as ours by holder, generation and state, never by exact equality
        (its expiry, and the bytes, differ from one attempt to the next), so a renewal after
        a lost reply does not fence this host off its own lease."""
        try:
            return self._write(lease, held.version)
        except PreconditionFailed as e:
            now = self.read(lease.workload)
            if now is not None and _same_step(now.lease, lease):
                if lease.state in (LeaseState.HANDED, LeaseState.RELEASED):
                    return now  # given away: the next holder may be writing it already
                # Still ours (an earlier renewal or prepare of ours landed): write it again
                # on the version found, so that what the store holds is this call's write,
                # sent after the caller's clock started (see the watchdog in fleet.py).
                try:
                    return self._write(replace(lease, expires=self.clock() + self.ttl), now.version)
                except PreconditionFailed:
                    now = self.read(lease.workload)
            raise LeaseLost(
                f"the lease of {lease.workload} changed under us"
                + (f": now held by {now.lease.holder}" if now else ": it is gone")
            ) from e

    # -- hosts -------------------------------------------------------------------------

    def heartbeat(
        self, version: str | None, prepared: dict[str, str] | None = None, draining: bool = False
    ) -> str:
        """Write this host's heartbeat; returns its new version (pass it next time).
        `prepared`: workloads whose newest checkpoint this host fetched ahead of a hand-over
        (workload -> checkpoint id), which the holder waits for. `draining`: this host is
        moving its workloads away (`checkpointer drain`): no other drain picks it."""
        key = host_key(self.host)
        doc = json.dumps(
            {
                "host": self.host,
                "seen": self.clock(),
                "ttl": self.ttl,
                "prepared": prepared or {},
                "draining": draining,
            }
        ).encode()
        try:
            return self.store.put_if(key, self.codec.seal(key, doc), version)
        except PreconditionFailed:
            _, current = self.store.get_versioned(key, _MAX_BYTES)
            return self.store.put_if(key, self.codec.seal(key, doc), current)

    def prepared_by(self, host: str) -> dict[str, str]:
        """What `host` says it fetched ahead of hand-overs (empty if it says nothing)."""
        key = host_key(host)
        try:
            blob, _ = self.store.get_versioned(key, _MAX_BYTES)
            doc = json.loads(self.codec.open(key, blob))
            prepared = doc.get("prepared") or {}
        except (BlobNotFound, CorruptCheckpoint, ValueError):
            return {}
        return {str(k): str(v) for k, v in prepared.items()} if isinstance(prepared, dict) else {}

    def draining(self, host: str) -> bool:
        """Whether `host`'s heartbeat says it is draining (False if it says nothing)."""
        key = host_key(host)
        try:
            blob, _ = self.store.get_versioned(key, _MAX_BYTES)
            doc = json.loads(self.codec.open(key, blob))
        except (BlobNotFound, CorruptCheckpoint, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("draining") is True

    def live_hosts(self) -> dict[str, float]:
        """Host id -> when it was last seen, for hosts seen within their TTL."""
        out: dict[str, float] = {}
        now = self.clock()
        for key in self.store.list(HOSTS):
            name = parse_as(key, FileType.HOST)
            if name is None:
                continue
            try:
                blob, _ = self.store.get_versioned(key, _MAX_BYTES)
                doc = json.loads(self.codec.open(key, blob))
                seen, ttl = float(doc["seen"]), float(doc["ttl"])
            except (BlobNotFound, CorruptCheckpoint, ValueError, KeyError, TypeError):
                continue
            if doc.get("host") == name.id and now <= seen + ttl + self.skew:
                out[name.id] = seen
        return out
