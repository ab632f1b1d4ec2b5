"""The supervisor: learns that a tree died and schedules what the restore policy decided.

Deaths arrive from the reaper (our children, with their exit status) and from the pidfd
watcher (trees that are not our children). The engine's Recovery lets the policy decide and
carries the decision out under the workload's lock (plan, then execute); the supervisor only
schedules: a timer per workload, so a back-off never blocks the reaper, and the decision
itself on a thread of its own, as the lock may be held by a checkpoint in flight.
"""

from __future__ import annotations

import logging
import os
import threading

from checkpointer.engine import Engine, Workload, WorkloadState
from checkpointer.engine.recovery import Recovery
from checkpointer.engine.workload import RestoreReason
from checkpointer.host import info as hostinfo
from checkpointer.workloads import process
from checkpointer.workloads.reaper import Reaper
from checkpointer.workloads.watcher import ExitWatcher

log = logging.getLogger(__name__)


# States in which a tree was, or was about to be, running when the daemon last stopped.
_INTERRUPTED = frozenset(
    {WorkloadState.RUNNING, WorkloadState.STOPPING, WorkloadState.RESTORING, WorkloadState.CRASHED}
)


class Supervisor:
    def __init__(self, engine: Engine, recovery: Recovery) -> None:
        self.engine = engine
        self.recovery = recovery
        self.reaper = Reaper(self._on_reaped)
        self.watcher = ExitWatcher(lambda pid: self._on_death(pid, None))
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._reaping = False

    def start(self) -> None:
        self.reaper.start()
        self._reaping = True

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            for t in self._timers.values():
                t.cancel()
            self._timers.clear()
        self.watcher.close()
        if self._reaping:
            self.reaper.stop()

    def track(self, w: Workload) -> None:
        """Watch a workload's new root PID: the reaper sees our children, a pidfd the rest."""
        if w.pid is not None and process.parent_of(w.pid) != os.getpid():
            self.watcher.watch(w.pid)

    def recover_at_start(self) -> None:
        """After the daemon (re)starts: re-adopt what still runs, restore what is gone."""
        booted = self.engine.registry.previous_boot_id not in (None, hostinfo.boot_id())
        for w in self.engine.workloads():
            if w.state not in _INTERRUPTED:
                continue
            if w.state is WorkloadState.RUNNING and w.alive() and not booted:
                log.info("workload %s re-adopted: pid %d still runs", w.name, w.pid)
                self.track(w)
                continue
            reason = RestoreReason.BOOT if booted else RestoreReason.CRASH
            why = "the host rebooted" if booted else "gone while the daemon was not running"
            self._decide(w.name, reason, fresh=why)  # a new boot or a long gap: no crash loop

    def bring_back(self, w: Workload, why: str) -> None:
        """A declared workload that is registered but stopped: restore its latest checkpoint
        (or cold-start it), as after a boot."""
        self._decide(w.name, RestoreReason.BOOT, fresh=why)

    def restore_soon(self, w: Workload, reason: str) -> None:
        """Restore now, whatever the crash policy says: the workload was handed to this host
        (migration) or left by a host that died (failover); its state is `restoring` already
        (Migration.take_over set it, under its lock)."""
        self._later(w.name, reason, 0.0)

    def decide(self, w: Workload, reason: str, clean: bool = False) -> None:
        """A workload is down (a rollback failed after stopping its tree): the policy decides,
        under the workload's lock (the caller holds it no more)."""
        self._decide(w.name, reason, clean)

    def _on_reaped(self, pid: int, status: int) -> None:
        self._on_death(pid, status)

    def _on_death(self, pid: int, status: int | None) -> None:
        if self._stopping:
            return
        w = self.engine.mark_dead(pid, status)
        if w is None:
            return
        # Off the reaper's thread: the decision waits for the workload's lock.
        name, clean = w.name, status == 0
        threading.Thread(
            target=self._decide,
            args=(name, RestoreReason.CRASH, clean),
            name=f"down-{name}",
            daemon=True,
        ).start()

    def _decide(
        self, name: str, reason: str, clean: bool = False, fresh: str | None = None
    ) -> None:
        if self._stopping:
            return
        delay = self.recovery.on_down(name, reason, clean, fresh)
        if delay is not None:
            self._later(name, reason, delay)

    def _later(self, name: str, reason: str, delay: float) -> None:
        timer = threading.Timer(delay, self._restore, args=(name, reason))
        timer.daemon = True
        with self._lock:
            old = self._timers.pop(name, None)
            if old:
                old.cancel()
            self._timers[name] = timer
        timer.start()

    def _restore(self, name: str, reason: str) -> None:
        with self._lock:
            self._timers.pop(name, None)
        if self._stopping:
            return
        try:
            again = self.recovery.auto_restore(name, reason)
        except Exception as e:
            log.exception("automatic restore of %s failed unexpectedly", name)
            self.recovery.failed_unexpectedly(name, e)
            return
        if again:
            # Storage down or a PID/port taken: the checkpoints are fine. Try the same again,
            # backing off as in a crash loop, without limit: giving up would lose the state.
            delay = self.recovery.retry_delay(name)
            if delay is not None:
                self._later(name, reason, delay)
