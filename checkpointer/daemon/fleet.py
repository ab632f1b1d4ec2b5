"""Fleet mode: hosts sharing one bucket, each workload owned by one host at a time.

Ownership is a lease in the bucket (storage/leases.py), taken and renewed with conditional
writes. This module keeps this host's leases and looks at every lease for work offered to this
host: a workload handed over by `migrate`, or, with `failover`, one whose owner stopped
renewing (judged by storage/leases.py on this host's monotonic clock). It also keeps this
host's heartbeat (`checkpointer hosts`).

This host's own leases are kept by the lease watchdog (lease_watchdog.py: renewals in
parallel, deadlines on the monotonic clock, the copy stopped at a deadline whatever the
bucket says; the timing argument is there). The scan runs on a thread of its own (heartbeat,
clock check, leases offered to this host), and the engine's `lost` and `offered` hooks, which
wait for a workload's lock (up to 600 s), run on a pool, never on the scan's thread nor the
watchdog's.

Before any of it, the store must prove that it enforces conditional writes, also under
concurrency, and that its clock agrees with this host's within `clock_skew`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from checkpointer.config import Config
from checkpointer.criu import CpuMismatch
from checkpointer.daemon.fleet_calls import CallWatcher
from checkpointer.daemon.fleet_clock import ClockSkewed, store_clock_offset
from checkpointer.daemon.lease_memory import SeenGenerations
from checkpointer.daemon.lease_watchdog import LeaseWatchdog
from checkpointer.errors import FleetUnavailable, MigrationFailed, NotOwner
from storage.backends.base import BlobStore
from storage.calls import Calls
from storage.crypto import Codec
from storage.errors import ConditionalWritesUnsupported, StorageError
from storage.lease_probe import probe_conditional_writes
from storage.leases import (
    Held,
    Lease,
    LeaseHeld,
    LeaseLost,
    Leases,
    LeaseState,
    may_restore,
)

log = logging.getLogger(__name__)

NOTHING_FETCHED = "-"
# A `prepared` value that starts with it says why this host cannot take the workload (its CPU
# lacks features the checkpoint uses): the holder then keeps it running instead of waiting.
REFUSED = "!"
# How often the scan asks the store for its clock (one LIST): a clock drifts slowly.
CLOCK_CHECK_EVERY = 60.0


@dataclass(frozen=True)
class FleetHooks:
    """What the fleet asks of the engine: stop a tree whose lease is lost; bring back one
    offered to this host (reason "migration" or "failover"); stop (SIGSTOP) and resume this
    host's copy at once, without the workload's lock (the watchdog's deadline)."""

    lost: Callable[[str, str | None], None]
    offered: Callable[[str, str], None]
    known: Callable[[], list[str]]  # workloads registered here that are running
    prefetch: Callable[[str], str | None]  # fetch the newest checkpoint ahead; its id
    newest: Callable[[str], str | None]  # the workload's newest checkpoint id
    freeze: Callable[[str], bool] = lambda name: False  # True: a running tree was stopped
    thaw: Callable[[str], None] = lambda name: None
    # The deadman (checkpointer/workloads/deadman.py), a process that stops the copy at the
    # deadline even while this daemon is paused: told every deadline, and when there is none.
    guard: Callable[[str, float], None] = lambda name, deadline: None
    unguard: Callable[[str], None] = lambda name: None


class Fleet:
    def __init__(
        self,
        config: Config,
        store: BlobStore,
        codec: Codec,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        f = config.fleet
        self.host = config.host.id
        self.store = store
        self.leases = Leases(store, codec, self.host, f.lease_ttl, f.clock_skew, clock, monotonic)
        self.ttl = f.lease_ttl
        self.skew = f.clock_skew
        self.renew_every = f.renew_every
        self.failover = f.failover
        self.clock = clock
        self.monotonic = monotonic
        self.hooks: FleetHooks | None = None
        self.renewal_failures = 0
        self.watchdog = LeaseWatchdog(
            self.leases, self.renew_every, self._on_kept, self._on_lost, self._on_failure, monotonic
        )
        self._seen: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._scanner = threading.Thread(target=self._scan_loop, name="fleet-scan", daemon=True)
        self.calls = Calls(store, codec, self.host)
        self._calls = CallWatcher(self.calls, self._called)
        self._hook_pool = ThreadPoolExecutor(4, thread_name_prefix="fleet-hook")
        self._hooks_running: set[tuple[str, str]] = set()
        self._heartbeat: str | None = None
        self._prepared: dict[str, str] = {}  # fetched ahead of a hand-over: name -> id
        self._preparing: set[str] = set()
        self.draining = False  # `checkpointer drain` runs: said in the heartbeat
        self._clock_checked = float("-inf")
        # The newest lease generation seen per workload, kept across restarts: a replayed
        # older lease is refused after a restart too (storage/leases.py).
        self._generations = SeenGenerations(config.state_dir / "lease-generations.json")
        self._generations.load(self.leases)
        self.unowned = 0
        self.clock_offset: float | None = None  # the store's clock minus ours, last seen

    def check_store(self) -> None:
        """Refuse fleet mode on a store that does not enforce conditional writes (also under
        concurrency), or whose clock differs from ours by more than clock_skew."""
        try:
            probe_conditional_writes(self.store)
        except ConditionalWritesUnsupported as e:
            raise FleetUnavailable(str(e)) from e
        self.check_clock()

    def check_clock(self) -> float | None:
        """This host's clock against the store's (fleet_clock.py); ClockSkewed beyond
        clock_skew."""
        self._clock_checked = self.monotonic()
        try:
            offset = store_clock_offset(self.store, self.clock, self.skew)
        except ClockSkewed as e:
            self.clock_offset = e.offset  # exported, then refused
            raise
        if offset is not None:
            self.clock_offset = offset
        return offset

    def start(self, hooks: FleetHooks) -> None:
        self.hooks = hooks
        self.watchdog.start(hooks)
        self._scan_tick()
        # A deadman of the previous daemon may have stopped trees whose leases are still
        # ours (the daemon was down past their deadlines): they run again.
        for name in hooks.known():
            if self.holds(name):
                hooks.thaw(name)
        self._scanner.start()
        self._calls.start()

    def stop(self) -> None:
        """Leases are kept (the workloads run on without the daemon); they expire unless the
        daemon is back within the TTL (the deadman stops the trees by then)."""
        self._stop.set()
        self._calls.stop()
        if self._scanner.is_alive():
            self._scanner.join(timeout=10)
        self.watchdog.stop()
        self._hook_pool.shutdown(wait=False, cancel_futures=True)
        self._generations.save(self.leases)

    # -- Ownership (what the engine asks) ----------------------------------------------

    def hold(self, name: str) -> int | None:
        held = self.watchdog.held(name)
        if held is None:
            raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
        if not self.watchdog.acting(name):
            raise NotOwner(
                f"the lease of {name} could not be renewed in time: this host ({self.host}) "
                "no longer acts as its owner"
            )
        return held.lease.generation

    def claim(self, name: str, newest: str | None) -> int | None:
        sent = self.monotonic()
        try:
            with self.watchdog.write_lock(name):
                held = self.leases.acquire(name, newest)
        except LeaseHeld as e:
            with self._lock:
                self._seen[name] = e.lease
            self.watchdog.drop(name)
            raise NotOwner(
                f"workload {name} is owned by host {e.lease.holder} ({e.lease.state}): it runs "
                f"there; `checkpointer migrate {name} --to {self.host}` on that host moves it"
            ) from e
        self.watchdog.kept(name, held, sent)
        return held.lease.generation

    def release(self, name: str) -> None:
        with self.watchdog.write_lock(name):
            held = self.watchdog.drop(name)
            if held is not None:
                with contextlib.suppress(LeaseLost, StorageError):
                    self.leases.release(held)

    def may_restore(self, name: str, checkpoint_id: str, generation: int | None) -> bool:
        held = self.watchdog.held(name)
        return held is None or may_restore(held.lease, checkpoint_id, generation)

    def owner(self, name: str) -> str | None:
        with self._lock:
            lease = self._seen.get(name)
        return lease.holder if lease else None

    # -- migration ---------------------------------------------------------------------

    def prepare(self, name: str, to: str | None) -> None:
        """Tell `to` (through the lease) that `name` is coming: it fetches the newest
        checkpoint ahead. None calls it off."""
        sent = self.monotonic()
        with self.watchdog.write_lock(name):
            held = self.watchdog.held(name)
            if held is None:
                raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
            updated = self.leases.prepare(held, to)
            self.watchdog.kept(name, updated, sent)
        if to is not None:
            self._call(to, name)

    def wait_prepared(self, name: str, to: str, timeout: float) -> str | None:
        """The checkpoint `to` fetched ahead, once it says so (None after `timeout`)."""
        deadline = self.monotonic() + timeout
        while self.monotonic() < deadline:
            try:
                done = self.leases.prepared_by(to).get(name)
            except StorageError:
                done = None
            if done and done.startswith(REFUSED):
                raise MigrationFailed(f"{done[1:]}: {name} keeps running on {self.host}")
            if done:
                return None if done == NOTHING_FETCHED else done
            time.sleep(0.2)
        return None

    def hand_over(self, name: str, to: str) -> None:
        with self.watchdog.write_lock(name):
            held = self.watchdog.held(name)
            if held is None:
                raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
            handed = self.leases.hand_over(held, to)
            with self._lock:
                self._seen[name] = handed.lease
            self.watchdog.drop(name)
        self._call(to, name)

    def _call(self, to: str, name: str) -> None:
        """Make `to` look at the lease of `name` now (storage/calls.py); best effort: its
        next scan sees the lease anyway."""
        try:
            self.calls.call(to, name)
        except StorageError as e:
            log.warning("fleet: cannot call host %s about %s: %s", to, name, e)

    def _called(self, name: str) -> None:
        """Another host called about `name`: act on its lease now, as the scan would."""
        held = self.leases.read(name)
        if held is not None:
            self._act_on(held.lease, expired=False)

    def lease(self, name: str) -> Lease | None:
        """The lease of `name` as the bucket has it now (StorageError if it cannot say)."""
        held = self.leases.read(name)
        return held.lease if held else None

    def live_hosts(self) -> dict[str, float]:
        return self.leases.live_hosts()

    def view(self) -> list[Lease]:
        with self._lock:
            return sorted(self._seen.values(), key=lambda lease: lease.workload)

    def holds(self, name: str) -> bool:
        return self.watchdog.held(name) is not None

    def tree_started(self, name: str) -> None:
        """The tree of `name` has a new PID: the deadman guards that one now."""
        self.watchdog.reguard(name)

    # -- what the watchdog tells -------------------------------------------------------

    def _on_kept(self, held: Held) -> None:
        with self._lock:
            self._seen[held.lease.workload] = held.lease

    def _on_lost(self, name: str) -> None:
        """Another host holds `name` (the copy here is stopped already): the engine kills it
        for good, on a hook thread."""
        current = self._read(name)
        holder = current.holder if current else None
        self._hook("lost", name, functools.partial(self._call_lost, name, holder))

    def _on_failure(self) -> None:
        self.renewal_failures += 1

    def _call_lost(self, name: str, holder: str | None) -> None:
        assert self.hooks is not None
        self.hooks.lost(name, holder)

    def _hook(self, kind: str, name: str, fn: Callable[[], None]) -> None:
        """Run an engine hook on the hook pool, one at a time per (kind, workload)."""
        with self._lock:
            if (kind, name) in self._hooks_running:
                return
            self._hooks_running.add((kind, name))

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("fleet: the %s hook of %s failed", kind, name)
            finally:
                with self._lock:
                    self._hooks_running.discard((kind, name))

        try:
            self._hook_pool.submit(run)
        except RuntimeError:  # shut down
            with self._lock:
                self._hooks_running.discard((kind, name))

    # -- the scan ----------------------------------------------------------------------

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._scan_tick()
            except Exception:
                log.exception("fleet: lease scan failed")

    def _scan_tick(self) -> None:
        assert self.hooks is not None
        self._beat()
        if self.monotonic() - self._clock_checked >= CLOCK_CHECK_EVERY:
            try:
                self.check_clock()
            except ClockSkewed as e:
                log.error("fleet: %s", e)
            except StorageError as e:
                log.warning("fleet: cannot read the store's clock: %s", e)
        for name in self.hooks.known():  # running here (re-adopted at start, or ours)
            if not self.holds(name):
                try:
                    # what this generation may restore besides its own: all there is now
                    self.claim(name, self.hooks.newest(name))
                except NotOwner as e:
                    log.error("fleet: %s; stopping the copy that runs here", e)
                    self.hooks.freeze(name)
                    holder = self.owner(name)
                    self._hook("lost", name, functools.partial(self._call_lost, name, holder))
                except StorageError as e:
                    log.warning("fleet: cannot claim %s yet: %s", name, e)
                else:
                    self.hooks.thaw(name)  # stopped by a daemon before this one, maybe
        self._scan()
        self._generations.save(self.leases)

    def set_draining(self, on: bool) -> None:
        """Say in the heartbeat, now, whether this host is draining (`checkpointer drain`)."""
        self.draining = on
        self._beat()

    def says_draining(self, host: str) -> bool:
        return self.leases.draining(host)

    def _beat(self) -> None:
        with self._lock:
            prepared = dict(self._prepared)
        try:
            self._heartbeat = self.leases.heartbeat(self._heartbeat, prepared, self.draining)
        except StorageError as e:
            log.warning("fleet: heartbeat failed: %s", e)

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
        unowned = 0
        for h in everything:
            expired = self.leases.expired(h)
            unowned += expired
            self._act_on(h.lease, expired)
        self.unowned = unowned

    def _act_on(self, lease: Lease, expired: bool) -> None:
        """What a lease asks of this host: fetch ahead (prepared for us), restore (handed
        to us), take over (expired, with failover)."""
        with self._lock:  # the scan and a call may look at one lease at once
            self._seen[lease.workload] = lease
            fetch = (
                lease.state is LeaseState.PREPARING
                and lease.next_holder == self.host
                and lease.workload not in self._preparing
            )
            if fetch:
                self._preparing.add(lease.workload)
        if fetch:
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
            self._offer(lease.workload, "migration")
        elif self.failover and expired and lease.holder != self.host:
            log.warning(
                "fleet: the lease of %s (host %s) was unchanged for its TTL + skew: taking it over",
                lease.workload,
                lease.holder,
            )
            self._offer(lease.workload, "failover")

    def _offer(self, name: str, reason: str) -> None:
        assert self.hooks is not None
        hooks = self.hooks
        self._hook("offered", name, lambda: hooks.offered(name, reason))

    def _prepare_for(self, name: str) -> None:
        """A hand-over to this host is coming: fetch the newest checkpoint now, while the
        tree still runs on its host (the migration then waits only for the pages changed
        since), say so in the heartbeat, and watch the lease closely until it arrives."""
        assert self.hooks is not None
        try:
            fetched = self.hooks.prefetch(name)
        except CpuMismatch as e:  # said in the heartbeat: the holder keeps it running
            log.error("fleet: %s", e)
            fetched = REFUSED + str(e)
        except Exception:
            log.exception("fleet: fetching %s ahead of its hand-over failed", name)
            fetched = None
        with self._lock:  # "-": nothing fetched, don't wait for us
            self._prepared[name] = fetched or NOTHING_FETCHED
        self._beat()
        deadline = self.monotonic() + 120
        try:
            while self.monotonic() < deadline and not self._stop.is_set():
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
