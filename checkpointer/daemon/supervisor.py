"""The supervisor: learns that a tree died and schedules what the restore policy decided.

Deaths arrive from the reaper (our children, with their exit status) and from the pidfd
watcher (trees that are not our children). The engine's Recovery lets the policy decide and
carries the decision out under the workload's lock (plan, then execute); the supervisor only
schedules: a timer per workload, so a back-off never blocks the reaper, and the decision
itself on a thread of its own, as the lock may be held by a checkpoint in flight.

The supervisor's own calls never end on WorkloadBusy (the lock held past MANUAL_LOCK_TIMEOUT,
600 s: a drill's rebuild, a long upload, a migration): nothing else would decide about the
death again, and the workload would sit `crashed` or `restoring` for good, with no alert. They
are tried again on the workload's timer, not by waiting for the lock without a timeout: a
timer is cancelled by `stop`, superseded by the next decision about the workload, and each
round logs why the workload is still down.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from checkpointer.engine import Engine, Workload, WorkloadState
from checkpointer.engine.recovery import Fresh, Recovery
from checkpointer.engine.workload import RestoreReason
from checkpointer.errors import WorkloadBusy
from checkpointer.host import info as hostinfo
from checkpointer.workloads import process
from checkpointer.workloads.reaper import Reaper
from checkpointer.workloads.watcher import ExitWatcher

log = logging.getLogger(__name__)


# States in which a tree was, or was about to be, running when the daemon last stopped.
_INTERRUPTED = frozenset(
    {WorkloadState.RUNNING, WorkloadState.STOPPING, WorkloadState.RESTORING, WorkloadState.CRASHED}
)

# After a decision or a restore found the workload's lock busy (having waited for it up to
# MANUAL_LOCK_TIMEOUT already): how long before the next try, which waits as long again.
BUSY_AGAIN = 5.0


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
            # A new boot or a long gap: no crash loop. Its state as seen here: on_down leaves
            # it alone if a manual restore or a take-over changed it meanwhile.
            self._decide(w.name, reason, fresh=Fresh(why, w.state))

    def bring_back(self, w: Workload, why: str) -> None:
        """A declared workload that is registered but stopped: restore its latest checkpoint
        (or cold-start it), as after a boot."""
        self._decide(w.name, RestoreReason.BOOT, fresh=Fresh(why, w.state))

    def restore_soon(self, w: Workload, reason: str) -> None:
        """Restore now, whatever the crash policy says: the workload was handed to this host
        (migration) or left by a host that died (failover); its state is `restoring` already
        (Migration.take_over set it, under its lock)."""
        self._later(w.name, 0.0, self._restore, w.name, reason)

    def decide(self, w: Workload, reason: str, clean: bool = False) -> None:
        """A workload is down (a rollback failed after stopping its tree): the policy decides,
        under the workload's lock, on a thread of its own: the rollback's caller gets its
        RestoreFailed at once, whoever holds the lock next."""
        self._decide_soon(w.name, reason, clean)

    def _on_reaped(self, pid: int, status: int) -> None:
        self._on_death(pid, status)

    def _on_death(self, pid: int, status: int | None) -> None:
        if self._stopping:
            return
        w = self.engine.mark_dead(pid, status)
        if w is None:
            return
        self._decide_soon(w.name, RestoreReason.CRASH, clean=status == 0)

    def _decide_soon(self, name: str, reason: str, clean: bool) -> None:
        """Off the caller's thread (the reaper, an API request): the decision waits for the
        workload's lock."""
        threading.Thread(
            target=self._decide, args=(name, reason, clean), name=f"down-{name}", daemon=True
        ).start()

    def _decide(
        self, name: str, reason: str, clean: bool = False, fresh: Fresh | None = None
    ) -> None:
        if self._stopping:
            return
        try:
            delay = self.recovery.on_down(name, reason, clean, fresh)
        except WorkloadBusy:
            log.warning(
                "workload %s is down and another operation still holds it: deciding again in %.0fs",
                name,
                BUSY_AGAIN,
            )
            self._later(name, BUSY_AGAIN, self._decide, name, reason, clean, fresh)
            return
        except Exception as e:
            log.exception("the restore policy's decision about %s failed unexpectedly", name)
            self.recovery.failed_unexpectedly(name, e)
            return
        if delay is not None:
            self._later(name, delay, self._restore, name, reason)

    def _later(self, name: str, delay: float, then: Callable[..., None], *args: object) -> None:
        """Run `then(*args)` in `delay` seconds on the workload's one timer, replacing the one
        pending: the newest decision about a workload is the one carried out."""
        if self._stopping:
            return
        timer = threading.Timer(delay, then, args=args)
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
            # Storage down or a PID/port taken: the checkpoints are fine. Try the same again,
            # backing off as in a crash loop, without limit: giving up would lose the state.
            delay = self.recovery.retry_delay(name) if again else None
        except WorkloadBusy:
            # Not the checkpoint's fault either (nothing was tried, nothing marked bad).
            log.warning(
                "restore of %s waits: another operation still holds it; trying again in %.0fs",
                name,
                BUSY_AGAIN,
            )
            self._later(name, BUSY_AGAIN, self._restore, name, reason)
            return
        except Exception as e:
            log.exception("automatic restore of %s failed unexpectedly", name)
            self.recovery.failed_unexpectedly(name, e)
            return
        if delay is not None:
            self._later(name, delay, self._restore, name, reason)
