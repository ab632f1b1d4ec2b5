"""The engine's side of the fleet (`FleetHooks`), and running those hooks off the fleet's own
threads: `lost` and `offered` wait for a workload's lock (up to 600 s), so they run on a pool,
one at a time per (kind, workload), never on the scan's, the watchdog's or the call watcher's
thread. In `step` mode (a simulation driving Fleet.step) they run at once instead."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetHooks:
    """What the fleet asks of the engine: stop a tree whose lease is lost; bring back one
    offered to this host (reason "migration" or "failover"); stop (SIGSTOP) and resume this
    host's copy at once, without the workload's lock (the watchdog's deadline)."""

    lost: Callable[[str, str | None], None]
    offered: Callable[[str, str], None]
    known: Callable[[], list[str]]  # workloads registered here that are running
    prefetch: Callable[[str], str | None]  # fetch the newest checkpoint ahead; its id
    # Unused since leases stopped recording the newest checkpoint (the head says what
    # exists): kept so that callers built against it go on working.
    newest: Callable[[str], str | None] = lambda name: None
    freeze: Callable[[str], bool] = lambda name: False  # True: a running tree was stopped
    thaw: Callable[[str], None] = lambda name: None
    # The deadman (checkpointer/workloads/deadman.py), a process that stops the copy at the
    # deadline even while this daemon is paused: told every deadline, and when there is none.
    guard: Callable[[str, float], None] = lambda name, deadline: None
    unguard: Callable[[str], None] = lambda name: None


class HookRunner:
    def __init__(self) -> None:
        self.inline = False  # step mode: run each hook at once, on the caller's thread
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="fleet-hook")
        self._running: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def run(self, kind: str, name: str, fn: Callable[[], None]) -> None:
        """Run `fn`, the `kind` hook of workload `name`, unless one runs already."""
        with self._lock:
            if (kind, name) in self._running:
                return
            self._running.add((kind, name))

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("fleet: the %s hook of %s failed", kind, name)
            finally:
                with self._lock:
                    self._running.discard((kind, name))

        if self.inline:
            run()
            return
        try:
            self._pool.submit(run)
        except RuntimeError:  # shut down
            with self._lock:
                self._running.discard((kind, name))

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
