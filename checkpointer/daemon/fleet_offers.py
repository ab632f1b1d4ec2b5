"""What a lease asks of this host, wherever it was read (a call from a migration's source, the
sweep, the leases of a host found dead): fetch the newest checkpoint ahead (PREPARING for us),
restore it (HANDED to us), take it over (its holder found dead, with failover). The engine
does the work through its hooks (fleet_hooks.py); this keeps what was fetched ahead (said in
the heartbeat, `prepared`), which hand-overs have not been taken yet, and who was last seen
holding each workload (`owner`, for `checkpointer status`)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from checkpointer.criu import CpuMismatch
from checkpointer.daemon.fleet_hooks import FleetHooks, HookRunner
from storage.errors import StorageError
from storage.leases import Lease, Leases, LeaseState

log = logging.getLogger(__name__)

NOTHING_FETCHED = "-"
# A `prepared` value that starts with it says why this host cannot take the workload (its CPU
# lacks features the checkpoint uses): the holder then keeps it running instead of waiting.
REFUSED = "!"
PREFETCH_WATCH = 120.0  # seconds a host that fetched ahead watches the lease for its hand-over


class Offers:
    def __init__(
        self,
        leases: Leases,
        failover: bool,
        runner: HookRunner,
        beat: Callable[[], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`beat`: write this host's heartbeat now (it says what was fetched ahead)."""
        self.host = leases.host
        self.leases = leases
        self.failover = failover
        self.runner = runner
        self.beat = beat
        self.monotonic = monotonic
        self.hooks: FleetHooks | None = None
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[str, Lease] = {}
        self._prepared: dict[str, str] = {}  # fetched ahead of a hand-over: name -> id
        self._preparing: set[str] = set()
        self._incoming: set[str] = set()  # handed to this host, not taken yet

    def seen(self, lease: Lease) -> None:
        with self._lock:
            self._seen[lease.workload] = lease

    def owner(self, name: str) -> str | None:
        with self._lock:
            lease = self._seen.get(name)
        return lease.holder if lease else None

    def prepared(self) -> dict[str, str]:
        with self._lock:
            return dict(self._prepared)

    def arrived(self, name: str) -> None:
        """This host took the lease of `name`: nothing more to wait for."""
        with self._lock:
            self._incoming.discard(name)
            self._preparing.discard(name)
            self._prepared.pop(name, None)

    def lost(self, name: str, holder: str | None) -> None:
        """Have the engine stop the copy of `name` here for good (`holder` owns it)."""
        hooks = self._hooks()
        self.runner.run("lost", name, functools.partial(hooks.lost, name, holder))

    def _hooks(self) -> FleetHooks:
        assert self.hooks is not None, "the fleet is not started"
        return self.hooks

    def act_on(self, lease: Lease, holder_dead: bool) -> None:
        """Fetch ahead (prepared for us), restore (handed to us), take over (its holder was
        found dead, with failover)."""
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
            self._fetch_ahead(lease.workload)
        if lease.holder == self.host and lease.state is LeaseState.HANDED:
            log.warning(
                "fleet: %s was handed to this host by %s", lease.workload, lease.previous_holder
            )
            with self._lock:
                self._incoming.add(lease.workload)
            self.offer(lease.workload, "migration")
        elif self.failover and holder_dead and lease.holder != self.host:
            log.warning(
                "fleet: the lease of %s is held by host %s, found dead: taking it over",
                lease.workload,
                lease.holder,
            )
            self.offer(lease.workload, "failover")

    def offer(self, name: str, reason: str) -> None:
        hooks = self._hooks()
        self.runner.run("offered", name, lambda: hooks.offered(name, reason))

    def again(self, holds: Callable[[str], bool]) -> None:
        """Leases handed to this host and not taken yet (the engine failed, or was busy):
        read again and offered again while they say so."""
        with self._lock:
            incoming = sorted(self._incoming)
        for name in incoming:
            lease = None if holds(name) else self.read(name)
            if lease is not None and lease.holder == self.host and lease.state is LeaseState.HANDED:
                self.offer(name, "migration")
            else:
                with self._lock:
                    self._incoming.discard(name)

    def read(self, name: str) -> Lease | None:
        try:
            held = self.leases.read(name)
        except StorageError:
            return None
        return held.lease if held else None

    def _fetch_ahead(self, name: str) -> None:
        if self.runner.inline:
            self._prepare_for(name, watch=False)
            return
        threading.Thread(
            target=self._prepare_for, args=(name, True), name=f"prefetch-{name}", daemon=True
        ).start()

    def _prepare_for(self, name: str, watch: bool) -> None:
        """A hand-over to this host is coming: fetch the newest checkpoint now, while the
        tree still runs on its host (the migration then waits only for the pages changed
        since), say so in the heartbeat, and (`watch`) look at the lease closely until it
        arrives."""
        hooks = self._hooks()
        try:
            fetched = hooks.prefetch(name)
        except CpuMismatch as e:  # said in the heartbeat: the holder keeps it running
            log.error("fleet: %s", e)
            fetched = REFUSED + str(e)
        except Exception:
            log.exception("fleet: fetching %s ahead of its hand-over failed", name)
            fetched = None
        with self._lock:  # "-": nothing fetched, don't wait for us
            self._prepared[name] = fetched or NOTHING_FETCHED
        self.beat()
        if not watch:
            return
        deadline = self.monotonic() + PREFETCH_WATCH
        try:
            while self.monotonic() < deadline and not self.stopped.is_set():
                lease = self.read(name)
                if lease is None or lease.state not in (LeaseState.PREPARING, LeaseState.HANDED):
                    return  # called off
                if lease.state is LeaseState.HANDED:
                    if lease.holder == self.host:
                        hooks.offered(name, "migration")
                    return
                time.sleep(0.1)
        finally:
            with self._lock:
                self._preparing.discard(name)
                self._prepared.pop(name, None)
