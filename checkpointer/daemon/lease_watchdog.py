"""The lease watchdog: this host's leases, renewed in time, and its copy of a workload stopped
at a lease's deadline whether or not the bucket answers (fleet mode, issue 26).

Two kinds of threads, so that nothing slow stands between a lease and its deadline:

- the watchdog (one thread) never calls the store and never takes a workload's lock: it
  starts renewals, and at each lease's local deadline stops this host's copy of the
  workload (SIGSTOP of its tree, `Copies.freeze`);
- renewals run on a pool, one call in flight per lease, all leases in parallel. A call may
  block as long as the retrying layer likes (~60 s): the watchdog never waits for it.

The timing argument. A write of the lease sent at monotonic time t0 gives the local deadline
t0 + TTL - skew. The version it wrote cannot land in the bucket, nor be read by another host,
before t0. Another host takes the lease over only after it has seen that version unchanged
for TTL + skew on its own monotonic clock, counted from the end of a read that returned it
(storage/leases.py), so from a time after t0: not before t0 + TTL + skew. This host's copy is
therefore stopped at least 2 x skew before another host may start its own, whatever the wall
clocks say; the 2 x skew covers the monotonic clocks' difference in rate, the watchdog's
reaction (it wakes at each deadline) and the time SIGSTOP takes to reach a tree. A renewal
that fails, hangs or loses its reply changes nothing: the deadline stays that of the last
write known to have landed (a write of ours found after a lost reply is written again, so
that the version in the bucket is one sent after this call began: storage/leases.py). A
renewal that lands after the deadline (conditional on our version: nobody took the lease)
resumes the stopped copy; a lease found taken has it killed by the engine (`on_lost`).

A pause of the whole daemon (SIGSTOP, a stall) pauses this thread too, not the workloads:
the deadman, a process of its own, holds a copy of every deadline and stops the copy then
(checkpointer/workloads/deadman.py). A pause of the whole machine pauses both; they act the
moment it runs again, before any storage call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from storage.errors import StorageError
from storage.leases import Held, LeaseLost, Leases

log = logging.getLogger(__name__)


class Copies(Protocol):
    """This host's copy of each workload, as the watchdog acts on it (the engine's side:
    checkpointer/engine/ownership.py LocalCopies)."""

    def freeze(self, name: str) -> bool:
        """SIGSTOP the tree, without the workload's lock; True if a running tree was found."""
        ...

    def thaw(self, name: str) -> None: ...

    def guard(self, name: str, deadline: float) -> None:
        """Give the deadman this deadline (monotonic) for the tree."""
        ...

    def unguard(self, name: str) -> None: ...


class LeaseWatchdog:
    def __init__(
        self,
        leases: Leases,
        renew_every: float,
        on_kept: Callable[[Held], None],
        on_lost: Callable[[str], None],
        on_failure: Callable[[], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_kept`: a lease was written (the fleet's view); `on_lost`: another host holds
        it now (called on a renewal thread, after the copy was stopped); `on_failure`: a
        renewal failed (lost, or no answer)."""
        self.leases = leases
        self.ttl, self.skew = leases.ttl, leases.skew
        self.renew_every = renew_every
        self.on_kept = on_kept
        self.on_lost = on_lost
        self.on_failure = on_failure
        self.monotonic = monotonic
        self.copies: Copies | None = None
        self._held: dict[str, Held] = {}
        self._deadline: dict[str, float] = {}  # monotonic: stop acting on the lease then
        self._sent: dict[str, float] = {}  # when the last renewal was started (monotonic)
        self._renewing: dict[str, Future[None]] = {}
        self._frozen: set[str] = set()  # copies stopped at their deadline, outcome unknown
        self._lock = threading.Lock()
        # One write at a time to each lease: a renewal and a hand-over (or prepare, release)
        # racing from two threads would each write over the version the other just replaced.
        # Seen: a container's final checkpoint took 4 s, a renewal fell in it, and the
        # hand-over failed. Per lease, so that one slow write holds up no other lease.
        self._writing: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lease-watchdog", daemon=True)
        self._renewals = ThreadPoolExecutor(16, thread_name_prefix="lease-renewal")

    def start(self, copies: Copies) -> None:
        self.copies = copies
        with self._lock:
            claimed = dict(self._deadline)  # claimed before there was anyone to tell
        for name, deadline in claimed.items():
            copies.guard(name, deadline)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._renewals.shutdown(wait=False, cancel_futures=True)

    # -- what the fleet asks -------------------------------------------------------------

    def held(self, name: str) -> Held | None:
        with self._lock:
            return self._held.get(name)

    def acting(self, name: str) -> bool:
        """Whether this host may still act as the owner: before the lease's deadline."""
        with self._lock:
            deadline = self._deadline.get(name, float("-inf"))
        return self.monotonic() < deadline

    def write_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._writing.setdefault(name, threading.Lock())

    def kept(self, name: str, held: Held, sent: float) -> None:
        """`held` was written by a call sent at `sent` (monotonic): the lease is ours until
        sent + TTL - skew (module docstring). A copy stopped at its deadline runs again."""
        with self._lock:
            self._held[name] = held
            deadline = max(sent + self.ttl - self.skew, self._deadline.get(name, float("-inf")))
            self._deadline[name] = deadline
            self._sent[name] = max(sent, self._sent.get(name, float("-inf")))
            resume = name in self._frozen and self.monotonic() < deadline
            if resume:
                self._frozen.discard(name)
        self.on_kept(held)
        if self.copies is not None:
            self.copies.guard(name, deadline)  # the deadman's copy of the deadline, first
            if resume:
                log.warning("fleet: the lease of %s was renewed after all: its copy runs", name)
                self.copies.thaw(name)
        self._wake.set()  # the next deadline may have changed

    def reguard(self, name: str) -> None:
        """The tree of `name` has a new PID (started, restored): the deadman must know it."""
        with self._lock:
            deadline = self._deadline.get(name)
        if deadline is not None and self.copies is not None:
            self.copies.guard(name, deadline)

    def drop(self, name: str) -> Held | None:
        """No longer ours: nothing to renew, no deadline to keep. What we held, if anything."""
        with self._lock:
            held = self._held.pop(name, None)
            self._deadline.pop(name, None)
            self._sent.pop(name, None)
            self._frozen.discard(name)
        if self.copies is not None:
            self.copies.unguard(name)
        return held

    # -- the watchdog and the renewals ---------------------------------------------------

    def _watch(self) -> None:
        """Start each lease's renewal when due; stop the copy of every workload whose lease
        reached its deadline. Only a dictionary walk and SIGSTOP happen on this thread."""
        while not self._stop.is_set():
            now = self.monotonic()
            wake = now + self.renew_every
            with self._lock:
                due = [
                    (name, self._deadline[name], self._sent.get(name, float("-inf")))
                    for name in self._held
                ]
            for name, deadline, sent in due:
                if now >= deadline:
                    self._freeze(name)
                else:
                    wake = min(wake, deadline)
                if now >= sent + self.renew_every:
                    self._start_renewal(name)
                else:
                    wake = min(wake, sent + self.renew_every)
            self._wake.wait(max(0.01, min(wake - self.monotonic(), 0.5)))
            self._wake.clear()

    def _freeze(self, name: str) -> None:
        with self._lock:
            if name in self._frozen:
                return
        assert self.copies is not None
        try:
            stopped = self.copies.freeze(name)
        except Exception:
            log.exception("fleet: stopping the copy of %s failed", name)
            return
        if stopped:
            with self._lock:
                self._frozen.add(name)
            log.error(
                "fleet: the lease of %s reached its deadline unrenewed: its copy here is "
                "stopped until the bucket says whose it is",
                name,
            )

    def _start_renewal(self, name: str) -> None:
        with self._lock:
            if name in self._renewing or name not in self._held:
                return
            self._sent[name] = self.monotonic()  # due again renew_every after this try
            try:
                self._renewing[name] = self._renewals.submit(self._renew, name)
            except RuntimeError:  # shut down
                return

    def _renew(self, name: str) -> None:
        """One renewal, on a pool thread; it may block as long as the store does."""
        sent = self.monotonic()
        try:
            with self.write_lock(name):
                held = self.held(name)
                if held is None:
                    return  # handed over or released meanwhile
                try:
                    renewed = self.leases.renew(held)
                except LeaseLost as e:
                    self.on_failure()
                    log.error("fleet: lost the lease of %s: %s", name, e)
                    self._lose(name)
                    return
                except StorageError as e:
                    self.on_failure()
                    log.warning("fleet: cannot renew the lease of %s: %s", name, e)
                    return
                self.kept(name, renewed, sent)
        except Exception:
            log.exception("fleet: renewing the lease of %s failed", name)
        finally:
            with self._lock:
                self._renewing.pop(name, None)

    def _lose(self, name: str) -> None:
        """Another host owns `name` now: stop the copy here at once (no lock needed); the
        fleet then has the engine kill it for good."""
        self.drop(name)
        if self.copies is not None:
            try:
                self.copies.freeze(name)
            except Exception:
                log.exception("fleet: stopping the copy of %s failed", name)
        self.on_lost(name)
