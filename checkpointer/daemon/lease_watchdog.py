"""The lease watchdog: this host's heartbeat written in time, and its copy of every workload
stopped at the heartbeat's deadline whether or not the bucket answers (fleet mode, issue 27).

A workload's lease is not renewed: it names this host, and it is live while this host's
heartbeat `hosts/<id>` is (storage/heartbeats.py). So one deadline covers all of this host's
leases, and the work per tick is one heartbeat PUT whatever the number of workloads.

Two kinds of threads, so that nothing slow stands between a lease and its deadline:

- the watchdog (one thread) never calls the store and never takes a workload's lock: it
  starts heartbeats when due, and at the deadline stops this host's copy of every workload
  (SIGSTOP of its tree, `Copies.freeze`);
- heartbeats run on a thread of their own, one in flight; the lease writes that follow a
  missed deadline run on a pool. A call may block as long as the retrying layer likes.

The timing argument (docs/fleet.md, R5, moved from each lease to the host). A heartbeat sent at
monotonic time t0 whose reply came back before the deadline then in force gives the deadline
t0 + TTL - skew. The version it wrote cannot land, nor be listed by another host, before t0.
Another host judges this one dead only once it has seen that version unchanged for TTL on its
own monotonic clock, counted from the end of the listing that first showed it
(storage/heartbeats.py Liveness), so not before t0 + TTL: this host's copies are stopped at
least `clock_skew` before any other host may take a lease (and its restore starts after that
write), whatever the wall clocks say. That margin is what this thread may wake late by, the
SIGSTOPs take, and the two monotonic clocks' rates differ by over a TTL (storage/heartbeats.py
says more). A heartbeat that fails, hangs or loses its reply changes nothing: the deadline
stays that of the last one known to have landed.

A heartbeat that lands after the deadline does not thaw anything by itself: a watcher may have
judged this host dead meanwhile and be about to take a lease with If-Match on the version it
read. Each lease is written again (`Leases.reassert`, conditional on our version), after that
heartbeat: a watcher that read the lease before loses its If-Match; one that reads it after
finds the heartbeat changed and takes nothing (storage/leases.py). The copy runs again only if
that write succeeds (still ours, same generation); a lease found taken has its copy killed by
the engine (`on_lost`). A reading alone would not do: the watcher's write may land just after.

A claim is acting only once a heartbeat that names the workload, sent after the lease was
written, has landed (`Fleet.claim` writes one at once): watchers learn which leases to read
when this host dies from its heartbeat, so a workload runs here only once they can find it.

A pause of the whole daemon (SIGSTOP, a stall) pauses this thread too, not the workloads: the
deadman, a process of its own, holds a copy of the deadline of every tree and stops it then
(checkpointer/workloads/deadman.py). A pause of the whole machine pauses both; they act the
moment it runs again, before any storage call. Both count time on CLOCK_BOOTTIME (the
"monotonic" clock of every deadline here, `deadman.boottime`), which goes on counting while
the machine is suspended: on CLOCK_MONOTONIC, which stops then, a host resumed after a suspend
longer than its TTL found its deadline not passed and ran its copies beside the new owners'.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from checkpointer.workloads.deadman import boottime
from storage.errors import StorageError
from storage.heartbeats import Heartbeats
from storage.leases import Held, LeaseLost, Leases

log = logging.getLogger(__name__)
NEVER = float("-inf")


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
        heartbeats: Heartbeats,
        timing: tuple[float, float, float],
        on_kept: Callable[[Held], None],
        on_lost: Callable[[str], None],
        on_failure: Callable[[], None],
        status: Callable[[], tuple[dict[str, str], bool]] = lambda: ({}, False),
        monotonic: Callable[[], float] = boottime,  # suspends count (deadman.boottime)
    ) -> None:
        """`timing`: (TTL, skew, renew_every). `on_kept`: a lease was written (the fleet's
        view); `on_lost`: another host holds it now (after the copy was stopped);
        `on_failure`: a heartbeat or a lease write failed; `status`: what else the heartbeat
        says (prepared, draining)."""
        self.leases = leases
        self.heartbeats = heartbeats
        self.ttl, self.skew, self.renew_every = timing
        self.on_kept = on_kept
        self.on_lost = on_lost
        self.on_failure = on_failure
        self.status = status
        self.monotonic = monotonic
        self.copies: Copies | None = None
        self._held: dict[str, Held] = {}
        self._claimed_at: dict[str, float] = {}  # monotonic: when its lease write returned
        self._named: set[str] = set()  # named by a heartbeat sent after that: may act
        self._stale: set[str] = set()  # past a deadline: not acting until written again
        self._frozen: set[str] = set()  # copies stopped at the deadline, outcome unknown
        self._deadline = NEVER  # monotonic: every lease stops acting then
        self._told = NEVER  # the deadline the deadman last had for every tree
        self._sent = NEVER  # when the last heartbeat was started
        self._beating = False
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()  # one heartbeat write at a time
        # One write at a time to each lease: a reassert and a hand-over (or prepare, release)
        # racing from two threads would each write over the version the other just replaced.
        self._writing: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._beater: ThreadPoolExecutor | None = None

    def start(self, copies: Copies, threads: bool = True) -> None:
        """Tell the copies their deadline; with `threads`, watch on a thread of its own (else
        the caller drives `check` and `beat`: Fleet.step)."""
        self.copies = copies
        with self._lock:
            deadline = self._deadline
            guarded = [n for n in self._held if n not in self._stale]
        for name in guarded:  # claimed before there was anyone to tell
            copies.guard(name, deadline)
        if threads:
            self._pool = ThreadPoolExecutor(16, thread_name_prefix="lease-write")
            self._beater = ThreadPoolExecutor(1, thread_name_prefix="heartbeat")
            self._thread = threading.Thread(target=self._watch, name="lease-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)
        for pool in (self._pool, self._beater):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # -- what the fleet asks -------------------------------------------------------------

    def held(self, name: str) -> Held | None:
        with self._lock:
            return self._held.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def live(self) -> bool:
        """Whether this host's last heartbeat is still good (before the deadline)."""
        with self._lock:
            return self.monotonic() < self._deadline

    def acting(self, name: str) -> bool:
        """Whether this host may act as the owner of `name`: named by a heartbeat, not past
        the deadline, and written again since a deadline it missed."""
        with self._lock:
            ok = name in self._named and name not in self._stale
            return ok and self.monotonic() < self._deadline

    def named(self, name: str) -> bool:
        with self._lock:
            return name in self._named

    def due(self) -> bool:
        """Whether a heartbeat is due (renew_every after the last one was started)."""
        with self._lock:
            return self.monotonic() >= self._sent + self.renew_every

    def write_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._writing.setdefault(name, threading.Lock())

    def claimed(self, name: str, held: Held) -> None:
        """`held` was just written by a claim: ours, acting once a heartbeat names it."""
        with self._lock:
            self._held[name] = held
            self._claimed_at[name] = self.monotonic()
            self._named.discard(name)
            self._stale.discard(name)
            deadline = self._deadline
        self.on_kept(held)
        if self.copies is not None:
            self.copies.guard(name, deadline)

    def kept(self, name: str, held: Held) -> None:
        """`held` was written by us over our own lease (prepare): still ours as it was."""
        with self._lock:
            if name in self._held:
                self._held[name] = held
        self.on_kept(held)

    def reguard(self, name: str) -> None:
        """The tree of `name` has a new PID (started, restored): the deadman must know it."""
        with self._lock:
            deadline = self._deadline if name in self._held else None
        if deadline is not None and self.copies is not None:
            self.copies.guard(name, deadline)

    def drop(self, name: str) -> Held | None:
        """No longer ours: nothing to keep, no deadline. What we held, if anything."""
        with self._lock:
            held = self._held.pop(name, None)
            self._claimed_at.pop(name, None)
            self._named.discard(name)
            self._stale.discard(name)
            self._frozen.discard(name)
        if self.copies is not None:
            self.copies.unguard(name)
        return held

    def lose(self, name: str) -> None:
        """Another host owns `name` now: stop the copy here at once (no lock needed); the
        fleet then has the engine kill it for good."""
        self.drop(name)
        if self.copies is not None:
            try:
                self.copies.freeze(name)
            except Exception:
                log.exception("fleet: stopping the copy of %s failed", name)
        self.on_lost(name)

    # -- the deadline ----------------------------------------------------------------------

    def check(self) -> float:
        """At the deadline, stop every copy here and mark every lease stale. No storage
        call, no lock of a workload. Returns when to check again (monotonic)."""
        now = self.monotonic()
        with self._lock:
            past = now >= self._deadline
            if past:
                self._stale |= set(self._held)
            to_freeze = [n for n in self._held if n not in self._frozen] if past else []
            wake = min(self._sent + self.renew_every, now + self.renew_every)
            if not past:
                wake = min(wake, self._deadline)
        for name in to_freeze:
            self._freeze(name)
        return wake

    def _freeze(self, name: str) -> None:
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
                "fleet: this host's heartbeat reached its deadline unrenewed: the copy of %s "
                "here is stopped until the bucket says whose it is",
                name,
            )

    # -- the heartbeat -----------------------------------------------------------------------

    def beat(self, need: str | None = None) -> None:
        """Write this host's heartbeat now, synchronously (StorageError if it failed). With
        `need`, only if no heartbeat naming `need` landed since its claim (claims running at
        once share one write)."""
        with self._beat_lock:
            if need is not None and self.named(need):
                return
            with self._lock:
                names = {n: h.lease.generation for n, h in self._held.items()}
                self._sent = sent = self.monotonic()  # due again renew_every after this try
            prepared, draining = self.status()
            try:
                self.heartbeats.write(names, prepared, draining)
            except StorageError:
                self.on_failure()
                raise
            self._landed(sent, names)

    def _landed(self, sent: float, names: dict[str, int]) -> None:
        """A heartbeat sent at `sent` naming `names` has landed: the new deadline; leases past
        a missed deadline written again (module docstring) before their copies run."""
        now = self.monotonic()
        with self._lock:
            if now >= self._deadline:
                self._stale |= set(self._held)  # late: whatever is held missed its deadline
            self._deadline = max(self._deadline, sent + self.ttl - self.skew)
            newly = [
                name
                for name in names
                if name in self._held
                and name not in self._named
                and sent >= self._claimed_at.get(name, float("inf"))
            ]
            self._named.update(newly)
            deadline = self._deadline
            stale = sorted(self._stale) if now < deadline else []
            # The deadman's copy of the deadline: every tree's when it moved by more than a
            # margin since last told (a burst of claims, one heartbeat each, would tell every
            # tree at each), else only the trees just named. Told late, the deadman's copy is
            # only earlier than the deadline: by less than the margin, which leaves it ahead
            # of now (renew_every + skew < TTL).
            margin = min(self.renew_every, (self.ttl - self.skew - self.renew_every) / 2)
            if deadline - self._told >= margin:
                self._told = deadline
                guarded = [n for n in self._held if n not in self._stale]
            else:
                guarded = [n for n in newly if n not in self._stale]
        if self.copies is not None:
            for name in guarded:
                self.copies.guard(name, deadline)
        for name in stale:
            self._spawn(lambda name=name: self._reassert(name))  # type: ignore[misc]
        self._wake.set()  # the deadline moved

    def _reassert(self, name: str) -> None:
        """Write the lease of `name` again after a missed deadline; its copy runs again only
        if it is still ours."""
        try:
            with self.write_lock(name):
                with self._lock:
                    held = self._held.get(name)
                    if held is None or name not in self._stale:
                        return
                    if self.monotonic() >= self._deadline:
                        return  # past the deadline again: the next heartbeat tries
                try:
                    kept = self.leases.reassert(held)
                except LeaseLost as e:
                    self.on_failure()
                    log.error("fleet: lost the lease of %s: %s", name, e)
                    self.lose(name)
                    return
                except StorageError as e:
                    self.on_failure()
                    log.warning("fleet: cannot write the lease of %s again yet: %s", name, e)
                    return
                with self._lock:
                    self._held[name] = kept
                    self._stale.discard(name)
                    deadline = self._deadline
                    resume = name in self._frozen and self.monotonic() < deadline
                    self._frozen.discard(name)
            self.on_kept(kept)
            if self.copies is not None:
                self.copies.guard(name, deadline)
                if resume:
                    log.warning("fleet: the lease of %s is still ours: its copy runs again", name)
                    self.copies.thaw(name)
        except Exception:
            log.exception("fleet: writing the lease of %s again failed", name)

    def _spawn(self, fn: Callable[[], None]) -> None:
        """On the pool (the daemon), or at once (Fleet.step)."""
        if self._pool is None:
            fn()
            return
        with contextlib.suppress(RuntimeError):  # shut down
            self._pool.submit(fn)

    # -- the watchdog's thread ---------------------------------------------------------------

    def _watch(self) -> None:
        """Stop the copies at the deadline; start the heartbeat when due. Only a dictionary
        walk and SIGSTOP happen on this thread."""
        while not self._stop.is_set():
            wake = self.check()
            if self.due():
                self._start_beat()
            self._wake.wait(max(0.01, min(wake - self.monotonic(), 0.5)))
            self._wake.clear()

    def _start_beat(self) -> None:
        with self._lock:
            if self._beating or self._beater is None:
                return
            self._beating = True
        try:
            self._beater.submit(self._beat_in_background)
        except RuntimeError:  # shut down
            with self._lock:
                self._beating = False

    def _beat_in_background(self) -> None:
        try:
            self.beat()
        except StorageError as e:
            log.warning("fleet: heartbeat failed: %s", e)
        except Exception:
            log.exception("fleet: heartbeat failed")
        finally:
            with self._lock:
                self._beating = False
