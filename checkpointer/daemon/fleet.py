"""Fleet mode: hosts sharing one bucket, each workload owned by one host at a time.

Ownership is a lease in the bucket (storage/leases.py), written only when it changes hands;
a host's liveness is its heartbeat (storage/heartbeats.py), so nothing a host does per tick
grows with the number of workloads, its own or others' (issue 27). This module is what the
engine asks (hold, claim, release, prepare, hand over) and ties the parts together:

- this host's heartbeat, its deadline, the copies stopped at it: lease_watchdog.py;
- the other hosts (one listing of `hosts/` a scan, the leases of a host found dead that are
  this host's turn to take, the slow sweep of `leases/`): fleet_scan.py, fleet_rank.py,
  fleet_sweep.py;
- calls from a migration's source, so the target acts at once: fleet_calls.py;
- the clock check against the store's: fleet_clock.py.

One round of all of it is `step()`, synchronous and without sleeping, at the time `monotonic`
says: what a simulation drives (bench.fleet_scale). The daemon runs the same pieces on
threads: the watchdog's (`LeaseWatchdog.check`, heartbeats on a thread of their own), the
scan's (`scan` every fleet.scan_every) and the call watcher's. The engine's `lost` and `offered`
hooks, which wait for a workload's lock (up to 600 s), run on a pool, never on those threads
(in `step` mode, at once).

Before any of it, the store must prove that it enforces conditional writes, also under
concurrency, and that its clock agrees with this host's within `clock_skew`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from checkpointer.config import Config
from checkpointer.daemon.fleet_calls import CallWatcher
from checkpointer.daemon.fleet_clock import ClockSkewed, store_clock_offset
from checkpointer.daemon.fleet_hooks import FleetHooks, HookRunner
from checkpointer.daemon.fleet_offers import NOTHING_FETCHED, REFUSED, Offers
from checkpointer.daemon.fleet_scan import SWEEP_EVERY, Watcher
from checkpointer.daemon.fleet_sweep import SWEEP_SHARE
from checkpointer.daemon.lease_memory import SeenGenerations
from checkpointer.daemon.lease_watchdog import LeaseWatchdog
from checkpointer.errors import FleetUnavailable, MigrationFailed, NotOwner
from checkpointer.workloads.deadman import boottime
from storage.backends.base import BlobStore
from storage.calls import Calls
from storage.crypto import Codec
from storage.errors import ConditionalWritesUnsupported, StorageError
from storage.heartbeats import Heartbeats, Liveness
from storage.lease_probe import probe_conditional_writes
from storage.leases import Held, Lease, LeaseHeld, LeaseLost, Leases

__all__ = ["NOTHING_FETCHED", "REFUSED", "Fleet", "FleetHooks"]

log = logging.getLogger(__name__)

# How often the scan asks the store for its clock (one LIST): a clock drifts slowly.
CLOCK_CHECK_EVERY = 60.0


class Fleet:
    def __init__(
        self,
        config: Config,
        store: BlobStore,
        codec: Codec,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = boottime,  # suspends count (deadman.boottime)
    ) -> None:
        f = config.fleet
        self.host = config.host.id
        self.store = store
        self.ttl, self.skew, self.renew_every = f.lease_ttl, f.clock_skew, f.renew_every
        self.scan_every = min(f.scan_every, f.renew_every)
        self.failover = f.failover
        self.sweep_every = SWEEP_EVERY
        self.clock = clock
        self.monotonic = monotonic
        self.heartbeats = Heartbeats(store, codec, self.host, self.ttl, clock, f.failover)
        self.liveness = Liveness(self.host, self.ttl)
        self.leases = Leases(
            store, codec, self.host, clock, holder_dead=lambda h: self.watcher.holder_dead(h)
        )
        self.watchdog = LeaseWatchdog(
            self.leases,
            self.heartbeats,
            (self.ttl, self.skew, self.renew_every),
            self._on_kept,
            self._on_lost,
            self._on_failure,
            self._status,
            monotonic,
        )
        self.runner = HookRunner()
        self.offers = Offers(self.leases, self.failover, self.runner, self._beat, monotonic)
        self.watcher = Watcher(
            self.heartbeats,
            self.leases,
            self.liveness,
            self.watchdog,
            self.offers.act_on,
            self.failover,
            monotonic,
            (self.scan_every, self.renew_every),
            lambda: self.draining,
        )
        self.hooks: FleetHooks | None = None
        self.renewal_failures = 0  # heartbeats and lease writes that failed
        self._stop = threading.Event()
        self._scanner = threading.Thread(target=self._scan_loop, name="fleet-scan", daemon=True)
        self.calls = Calls(store, codec, self.host)
        self._calls = CallWatcher(self.calls, self._called)
        self.draining = False  # `checkpointer drain` runs: said in the heartbeat
        self._clock_checked = float("-inf")
        self._swept = float("-inf")
        # The newest lease generation seen per workload, kept across restarts: a replayed
        # older lease is refused after a restart too (storage/leases.py).
        self._generations = SeenGenerations(config.state_dir / "lease-generations.json")
        self._generations.load(self.leases)
        self.clock_offset: float | None = None  # the store's clock minus ours, last seen
        self.unowned = 0  # workloads held by hosts found dead, not taken over yet (a gauge)

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

    def start(self, hooks: FleetHooks, threads: bool = True) -> None:
        """Begin: the first heartbeat, a first scan (claims of what runs here). With
        `threads` False nothing runs in the background and hooks run at once: the caller
        drives `step` (a simulation)."""
        self.hooks = self.offers.hooks = hooks
        self.runner.inline = not threads
        self.watchdog.start(hooks, threads)
        self._swept = self.monotonic()  # the first sweep one interval from now
        self._beat()
        self.scan()
        # A deadman of the previous daemon may have stopped trees whose leases are still
        # ours (the daemon was down past their deadlines): they run again.
        for name in hooks.known():
            if self.watchdog.acting(name):
                hooks.thaw(name)
        if threads:
            self._scanner.start()
            self._calls.start()

    def stop(self) -> None:
        """Leases are kept (the workloads run on without the daemon); other hosts find this
        one dead unless the daemon is back within the TTL (the deadman stops the trees by
        then)."""
        self._stop.set()
        self.offers.stopped.set()
        self._calls.stop()
        if self._scanner.is_alive():
            self._scanner.join(timeout=10)
        self.watchdog.stop()
        self.runner.stop()
        self._generations.save(self.leases)

    # -- one round -----------------------------------------------------------------------

    def step(self) -> float:
        """One round of this host's fleet work, synchronously, with no sleeping: the
        deadline (copies stopped at it), the heartbeat if due, then `scan`. Returns when the
        next round is wanted (monotonic): the next heartbeat, deadline or judgement."""
        wake = self.watchdog.check()
        if self.watchdog.due():
            self._beat()
            wake = self.watchdog.check()
        return min(wake, self.scan())

    def scan(self) -> float:
        """The clock check when due; claims of trees running here unclaimed; one listing of
        `hosts/` and what it asks (dead hosts' leases offered); leases handed here and not
        taken yet; the sweep when due, and a share of its reads (fleet_sweep.py). Per scan:
        1 LIST, plus this host's own work. Returns when the next scan is wanted: scan_every
        after this one started, or sooner when another host may be found dead then (it is
        judged when due, not at the next scan after), or a dead host's workload is this
        host's turn to take."""
        assert self.hooks is not None
        started = self.monotonic()
        if started - self._clock_checked >= CLOCK_CHECK_EVERY:
            try:
                self.check_clock()
            except ClockSkewed as e:
                log.error("fleet: %s", e)
            except StorageError as e:
                log.warning("fleet: cannot read the store's clock: %s", e)
        self._claim_known()
        try:
            self.watcher.look()
        except StorageError as e:
            log.warning("fleet: cannot list the hosts: %s", e)
        self.unowned = self.watcher.unowned
        self.offers.again(self.holds)
        if self.monotonic() - self._swept >= self.sweep_every:
            self._swept = self.monotonic()
            try:
                self.watcher.sweep()
            except StorageError as e:
                log.warning("fleet: cannot sweep the leases: %s", e)
        self.watcher.sweep_some(self.monotonic() + SWEEP_SHARE * self.scan_every)
        self._generations.save(self.leases)
        now = self.monotonic()
        due = min(self.liveness.next_due(), self.watcher.wake())
        # After a scan that overran its period (a slow store), a third of one: listings back
        # to back would cost as much again and tell little more.
        wanted = max(started + self.scan_every, now + self.scan_every / 3)
        # Due while this scan ran (its listing started before): again now, not a period later
        # (in bench.fleet_scale a host's judgement fell due exactly as the listing ten periods
        # after its first sighting returned: every failover took a scan period more). Due
        # before it started and not judged (its heartbeat unreadable): at the next period.
        return max(due, now) if started < due < wanted else wanted

    def _scan_loop(self) -> None:
        wait = self.scan_every
        while not self._stop.wait(wait):
            try:
                wait = self.scan() - self.monotonic()
            except Exception:
                log.exception("fleet: scan failed")
                wait = self.scan_every

    def _claim_known(self) -> None:
        """Trees running here (re-adopted at start, or ours) that this host does not hold."""
        assert self.hooks is not None
        for name in self.hooks.known():
            if self.holds(name):
                continue
            try:
                self.claim(name)
            except NotOwner as e:
                log.error("fleet: %s; stopping the copy that runs here", e)
                self.hooks.freeze(name)
                self.offers.lost(name, self.owner(name))
            except StorageError as e:
                log.warning("fleet: cannot claim %s yet: %s", name, e)
            else:
                self.hooks.thaw(name)  # stopped by a daemon before this one, maybe

    # -- ownership (what the engine asks) --------------------------------------------------

    def hold(self, name: str) -> int | None:
        held = self.watchdog.held(name)
        if held is None:
            raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
        if not self.watchdog.acting(name):
            raise NotOwner(
                f"this host's ({self.host}) heartbeat has not kept the lease of {name} in "
                "time: it does not act as its owner now"
            )
        return held.lease.generation

    def claim(self, name: str) -> int | None:
        """Take (or keep) the lease of `name`: written, then named in a heartbeat (acting
        from then on). A lease held and acting is ours already: nothing is written."""
        held = self.watchdog.held(name)
        if held is not None and self.watchdog.acting(name):
            return held.lease.generation
        if not self.watchdog.live():
            self.watchdog.beat()  # a heartbeat that landed first (lease_watchdog.py)
        try:
            with self.watchdog.write_lock(name):
                held = self.leases.acquire(name)
        except LeaseHeld as e:
            self.offers.seen(e.lease)
            self.watchdog.drop(name)
            raise NotOwner(
                f"workload {name} is owned by host {e.lease.holder} ({e.lease.state}): it runs "
                f"there; `checkpointer migrate {name} --to {self.host}` on that host moves it"
            ) from e
        self.offers.arrived(name)
        self.watchdog.claimed(name, held)
        self.watchdog.beat(need=name)  # StorageError: held, acting after the next heartbeat
        return held.lease.generation

    def release(self, name: str) -> None:
        with self.watchdog.write_lock(name):
            held = self.watchdog.drop(name)
            if held is not None:
                try:
                    self.leases.release(held)
                except (LeaseLost, StorageError) as e:
                    log.warning("fleet: releasing the lease of %s: %s", name, e)

    def owner(self, name: str) -> str | None:
        return self.offers.owner(name)

    def holds(self, name: str) -> bool:
        return self.watchdog.held(name) is not None

    def tree_started(self, name: str) -> None:
        """The tree of `name` has a new PID: the deadman guards that one now."""
        self.watchdog.reguard(name)

    # -- migration -------------------------------------------------------------------------

    def prepare(self, name: str, to: str | None) -> None:
        """Tell `to` (through the lease, and a call) that `name` is coming: it fetches the
        newest checkpoint ahead. None calls it off."""
        with self.watchdog.write_lock(name):
            held = self.watchdog.held(name)
            if held is None:
                raise NotOwner(f"this host ({self.host}) does not hold the lease of {name}")
            self.watchdog.kept(name, self.leases.prepare(held, to))
        if to is not None:
            self._call(to, name)

    def wait_prepared(self, name: str, to: str, timeout: float) -> str | None:
        """The checkpoint `to` fetched ahead, once its heartbeat says so (None after
        `timeout`)."""
        deadline = self.monotonic() + timeout
        while self.monotonic() < deadline:
            try:
                found = self.heartbeats.read(to)
                done = found[0].prepared.get(name) if found and found[0] else None
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
            self.offers.seen(self.leases.hand_over(held, to).lease)
            self.watchdog.drop(name)
        self._call(to, name)

    def _call(self, to: str, name: str) -> None:
        """Make `to` look at the lease of `name` now (storage/calls.py); best effort: its
        sweep finds the lease anyway."""
        try:
            self.calls.call(to, name)
        except StorageError as e:
            log.warning("fleet: cannot call host %s about %s: %s", to, name, e)

    def _called(self, name: str) -> None:
        """Another host called about `name`: act on its lease now."""
        held = self.leases.read(name)
        if held is not None:
            self.offers.act_on(held.lease, False)

    def lease(self, name: str) -> Lease | None:
        """The lease of `name` as the bucket has it now (StorageError if it cannot say)."""
        held = self.leases.read(name)
        return held.lease if held else None

    # -- views (on demand: `hosts`, `migrate`, `drain`) -------------------------------------

    def live_hosts(self) -> dict[str, float]:
        """Host id -> when it last wrote its heartbeat (its clock), for hosts within TTL."""
        return {h: beat.seen for h, beat in self.heartbeats.live(self.skew).items()}

    def view(self) -> list[Lease]:
        """Who holds what: the workloads each live host's heartbeat lists (read now), and
        this host's own leases."""
        out: dict[str, Lease] = {}
        for host, beat in self.heartbeats.live(self.skew).items():
            if host != self.host:
                for name, generation in beat.workloads.items():
                    out[name] = Lease(name, host, generation)
        for name in self.watchdog.names():
            held = self.watchdog.held(name)
            if held is not None:
                out[name] = held.lease
        return sorted(out.values(), key=lambda lease: lease.workload)

    def set_draining(self, on: bool) -> None:
        """Say in the heartbeat, now, whether this host is draining (`checkpointer drain`)."""
        self.draining = on
        self._beat()

    def says_draining(self, host: str) -> bool:
        """Whether `host`'s heartbeat says it is draining (False if it says nothing)."""
        try:
            found = self.heartbeats.read(host)
        except StorageError:
            return False
        return bool(found and found[0] and found[0].draining)

    # -- what the watchdog tells -----------------------------------------------------------

    def _status(self) -> tuple[dict[str, str], bool]:
        return self.offers.prepared(), self.draining

    def _beat(self) -> None:
        try:
            self.watchdog.beat()
        except StorageError as e:
            log.warning("fleet: heartbeat failed: %s", e)

    def _on_kept(self, held: Held) -> None:
        self.offers.seen(held.lease)

    def _on_lost(self, name: str) -> None:
        """Another host holds `name` (the copy here is stopped already): the engine kills it
        for good, on a hook thread."""
        current = self.offers.read(name)
        self.offers.lost(name, current.holder if current else None)

    def _on_failure(self) -> None:
        self.renewal_failures += 1
