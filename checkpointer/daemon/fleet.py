"""Fleet mode: hosts sharing one bucket, each workload owned by one host at a time.

Ownership is a lease in the bucket (storage/leases.py), taken and renewed with conditional
writes. This module keeps this host's leases: it renews them every `renew_every`, tells the
engine when one is lost (another host took it while this one was partitioned or paused: the
engine then stops the tree, so that only one copy runs), and looks at every lease for work
offered to this host: a workload handed over by `migrate`, or, with `failover`, one whose
owner stopped renewing. It also keeps this host's heartbeat (`checkpointer hosts`).

Before any of it, the store must prove that it enforces conditional writes; a store that
only pretends to (seen: s3rver) would let two hosts own one workload.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from checkpointer.config import Config
from checkpointer.errors import FleetUnavailable, NotOwner
from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import ConditionalWritesUnsupported, StorageError
from storage.leases import (
    Held,
    Lease,
    LeaseHeld,
    LeaseLost,
    Leases,
    LeaseState,
    may_restore,
    probe_conditional_writes,
)

log = logging.getLogger(__name__)

NOTHING_FETCHED = "-"


@dataclass(frozen=True)
class FleetHooks:
    """What the fleet asks of the engine: stop a tree whose lease is lost; bring back one
    offered to this host (reason "migration" or "failover")."""

    lost: Callable[[str, str | None], None]
    offered: Callable[[str, str], None]
    known: Callable[[], list[str]]  # workloads registered here that are running
    prefetch: Callable[[str], str | None]  # fetch the newest checkpoint ahead; its id
    newest: Callable[[str], str | None]  # the workload's newest checkpoint id


class Fleet:
    def __init__(
        self,
        config: Config,
        store: BlobStore,
        codec: Codec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        f = config.fleet
        self.host = config.host.id
        self.store = store
        self.leases = Leases(store, codec, self.host, f.lease_ttl, f.clock_skew, clock)
        self.renew_every = f.renew_every
        self.failover = f.failover
        self.clock = clock
        self.hooks: FleetHooks | None = None
        self._held: dict[str, Held] = {}
        self._seen: dict[str, Lease] = {}
        self._lock = threading.Lock()
        # One write at a time to this host's leases: a renewal and a hand-over (or prepare,
        # release) racing from two threads would each write over the version the other just
        # replaced, and the loser would think the lease lost. Seen: a container's final
        # checkpoint took 4 s, a renewal fell in it, and the hand-over failed.
        self._writing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)
        self._heartbeat: str | None = None
        self._prepared: dict[str, str] = {}  # fetched ahead of a hand-over: name -> id
        self._preparing: set[str] = set()
        self.renewal_failures = 0
        self.unowned = 0

    def check_store(self) -> None:
        try:
            probe_conditional_writes(self.store)
        except ConditionalWritesUnsupported as e:
            raise FleetUnavailable(str(e)) from e

    def start(self, hooks: FleetHooks) -> None:
        self.hooks = hooks
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        """Leases are kept (the workloads run on without the daemon); they expire unless the
        daemon is back within the TTL."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- Ownership (what the engine asks) ----------------------------------------------

    def hold(self, name: str) -> int | None:
        with self._lock:
            held = self._held.get(name)
        if held is None:
            raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
        if self.clock() > held.lease.expires - self.leases.skew:
            raise NotOwner(
                f"the lease of {name} could not be renewed in time: this host ({self.host}) "
                "no longer acts as its owner"
            )
        return held.lease.generation

    def claim(self, name: str, newest: str | None) -> int | None:
        try:
            held = self.leases.acquire(name, newest)
        except LeaseHeld as e:
            with self._lock:
                self._seen[name] = e.lease
                self._held.pop(name, None)
            raise NotOwner(
                f"workload {name} is owned by host {e.lease.holder} ({e.lease.state}): it runs "
                f"there; `checkpointer migrate {name} --to {self.host}` on that host moves it"
            ) from e
        with self._lock:
            self._held[name] = held
            self._seen[name] = held.lease
        return held.lease.generation

    def release(self, name: str) -> None:
        with self._writing:
            with self._lock:
                held = self._held.pop(name, None)
            if held is not None:
                with contextlib.suppress(LeaseLost, StorageError):
                    self.leases.release(held)

    def may_restore(self, name: str, checkpoint_id: str, generation: int | None) -> bool:
        with self._lock:
            held = self._held.get(name)
        return held is None or may_restore(held.lease, checkpoint_id, generation)

    def owner(self, name: str) -> str | None:
        with self._lock:
            lease = self._seen.get(name)
        return lease.holder if lease else None

    # -- migration ---------------------------------------------------------------------

    def prepare(self, name: str, to: str | None) -> None:
        """Tell `to` (through the lease) that `name` is coming: it fetches the newest
        checkpoint ahead. None calls it off."""
        with self._writing:
            with self._lock:
                held = self._held.get(name)
            if held is None:
                raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
            updated = self.leases.prepare(held, to)
            with self._lock:
                self._held[name] = updated
                self._seen[name] = updated.lease

    def wait_prepared(self, name: str, to: str, timeout: float) -> str | None:
        """The checkpoint `to` fetched ahead, once it says so (None after `timeout`)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            try:
                done = self.leases.prepared_by(to).get(name)
            except StorageError:
                done = None
            if done:
                return None if done == NOTHING_FETCHED else done
            time.sleep(0.2)
        return None

    def hand_over(self, name: str, to: str) -> None:
        with self._writing:
            with self._lock:
                held = self._held.get(name)
            if held is None:
                raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
            handed = self.leases.hand_over(held, to)
            with self._lock:
                self._held.pop(name, None)
                self._seen[name] = handed.lease

    def live_hosts(self) -> dict[str, float]:
        return self.leases.live_hosts()

    def view(self) -> list[Lease]:
        with self._lock:
            return sorted(self._seen.values(), key=lambda lease: lease.workload)

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._held

    # -- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._tick()
            except Exception:
                log.exception("fleet: lease round failed")

    def _tick(self) -> None:
        assert self.hooks is not None
        try:
            with self._lock:
                prepared = dict(self._prepared)
            self._heartbeat = self.leases.heartbeat(self._heartbeat, prepared)
        except StorageError as e:
            log.warning("fleet: heartbeat failed: %s", e)
        self._renew()
        for name in self.hooks.known():  # running here (re-adopted at start, or ours)
            if not self.holds(name):
                try:
                    # what this generation may restore besides its own: all there is now
                    self.claim(name, self.hooks.newest(name))
                except NotOwner as e:
                    log.error("fleet: %s; stopping the copy that runs here", e)
                    self.hooks.lost(name, self.owner(name))
                except StorageError as e:
                    log.warning("fleet: cannot claim %s yet: %s", name, e)
        self._scan()

    def _renew(self) -> None:
        assert self.hooks is not None
        with self._lock:
            names = list(self._held)
        for name in names:
            with self._writing:
                lost = self._renew_one(name)
            if lost is not None:  # outside the write lock: stopping the copy takes its lock
                self.hooks.lost(name, lost or None)

    def _renew_one(self, name: str) -> str | None:
        """Renew one lease; None if kept, else who holds it now ("" unknown)."""
        with self._lock:
            h = self._held.get(name)
        if h is None:
            return None  # handed over or released since the list was taken
        try:
            renewed = self.leases.renew(h)
        except LeaseLost as e:
            self.renewal_failures += 1
            with self._lock:
                self._held.pop(name, None)
            log.error("fleet: lost the lease of %s: %s", name, e)
            current = self._read(name)
            return current.holder if current else ""
        except StorageError as e:
            self.renewal_failures += 1
            log.warning("fleet: cannot renew the lease of %s: %s", name, e)
            if self.clock() > h.lease.expires - self.leases.skew:
                with self._lock:
                    self._held.pop(name, None)
                log.error("fleet: the lease of %s runs out: stopping it here", name)
                return ""
            return None
        with self._lock:
            if name in self._held:
                self._held[name] = renewed
            self._seen[name] = renewed.lease
        return None

    def _read(self, name: str) -> Lease | None:
        try:
            held = self.leases.read(name)
        except StorageError:
            return None
        return held.lease if held else None

    def _scan(self) -> None:
        assert self.hooks is not None
        try:
            everything = self.leases.all()
        except StorageError as e:
            log.warning("fleet: cannot list leases: %s", e)
            return
        now, unowned = self.clock(), 0
        for h in everything:
            lease = h.lease
            with self._lock:
                self._seen[lease.workload] = lease
            expired = lease.state is not LeaseState.RELEASED and lease.expired(
                now, self.leases.skew
            )
            unowned += expired
            if (
                lease.state is LeaseState.PREPARING
                and lease.next_holder == self.host
                and lease.workload not in self._preparing
            ):
                self._preparing.add(lease.workload)
                threading.Thread(
                    target=self._prepare_for,
                    args=(lease.workload,),
                    name=f"prefetch-{lease.workload}",
                    daemon=True,
                ).start()
            if lease.holder == self.host and lease.state is LeaseState.HANDED:
                log.warning(
                    "fleet: %s was handed to this host by %s", lease.workload, lease.previous_holder
                )
                self.hooks.offered(lease.workload, "migration")
            elif self.failover and expired and lease.holder != self.host:
                log.warning(
                    "fleet: the lease of %s (host %s) expired: taking it over",
                    lease.workload,
                    lease.holder,
                )
                self.hooks.offered(lease.workload, "failover")
        self.unowned = unowned

    def _prepare_for(self, name: str) -> None:
        """A hand-over to this host is coming: fetch the newest checkpoint now, while the
        tree still runs on its host (the migration then waits only for the pages changed
        since), say so in the heartbeat, and watch the lease closely until it arrives."""
        assert self.hooks is not None
        try:
            fetched = self.hooks.prefetch(name)
        except Exception:
            log.exception("fleet: fetching %s ahead of its hand-over failed", name)
            fetched = None
        with self._lock:  # "-": nothing fetched, don't wait for us
            self._prepared[name] = fetched or NOTHING_FETCHED
            prepared = dict(self._prepared)
        try:
            self._heartbeat = self.leases.heartbeat(self._heartbeat, prepared)
        except StorageError as e:
            log.warning("fleet: heartbeat failed: %s", e)
        deadline = self.clock() + 120
        try:
            while self.clock() < deadline and not self._stop.is_set():
                lease = self._read(name)
                if lease is None or lease.state not in (LeaseState.PREPARING, LeaseState.HANDED):
                    return  # called off
                if lease.state is LeaseState.HANDED:
                    if lease.holder == self.host:
                        self.hooks.offered(name, "migration")
                    return
                time.sleep(0.1)
        finally:
            with self._lock:
                self._preparing.discard(name)
                self._prepared.pop(name, None)
