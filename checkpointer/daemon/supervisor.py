"""The supervisor: learns that a tree died and has the engine bring it back, by policy.

Deaths arrive from the reaper (our children, with their exit status) and from the pidfd
watcher (trees that are not our children). The restore policy decides what to do and when;
a timer per workload carries it out, so a back-off never blocks the reaper.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from checkpointer.engine import Engine, Workload, WorkloadState
from checkpointer.engine.policy import Streak, on_death, retry_later
from checkpointer.engine.workload import RestoreResult
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
    def __init__(self, engine: Engine, auto_restore: Callable[[str, str], bool]) -> None:
        """`auto_restore`: Recovery.auto_restore, which carries out what the policy decided;
        True when it should be tried again later."""
        self.engine = engine
        self.auto_restore = auto_restore
        self.reaper = Reaper(self._on_reaped)
        self.watcher = ExitWatcher(lambda pid: self._on_death(pid, None))
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        self.reaper.start()

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            for t in self._timers.values():
                t.cancel()
            self._timers.clear()
        self.watcher.close()
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
            reason = "boot" if booted else "crash"
            w.state = WorkloadState.CRASHED
            w.exit_status = (
                "the host rebooted" if booted else "gone while the daemon was not running"
            )
            w.streak = Streak()  # a new boot or a long gap is not a crash loop
            self.decide(w, reason)

    def bring_back(self, w: Workload, why: str) -> None:
        """A declared workload that is registered but stopped: restore its latest checkpoint
        (or cold-start it), as after a boot."""
        w.state, w.exit_status, w.streak = WorkloadState.CRASHED, why, Streak()
        self.decide(w, "boot")

    def restore_soon(self, w: Workload, reason: str) -> None:
        """Restore now, whatever the crash policy says: the workload was handed to this host
        (migration) or left by a host that died (failover)."""
        w.state = WorkloadState.RESTORING
        self.engine.save()
        self._later(w.name, reason, 0.0)

    def _on_reaped(self, pid: int, status: int) -> None:
        self._on_death(pid, status)

    def _on_death(self, pid: int, status: int | None) -> None:
        if self._stopping:
            return
        w = self.engine.mark_dead(pid, status)
        if w is not None:
            self.decide(w, "crash", clean=status == 0)

    def decide(self, w: Workload, reason: str, clean: bool = False) -> None:
        """A workload is down: let the restore policy say whether, when and from what."""
        d = on_death(w.restore, w.streak, time.time(), clean, _restored_from(w))
        w.streak = d.streak
        if d.action == "ignore":
            log.info("workload %s: %s", w.name, d.why)
            self.engine.save()
            return
        if d.action == "give_up":
            self.engine.fail(w, d.why)
            return
        w.state = WorkloadState.RESTORING
        self.engine.save()
        log.warning(
            "workload %s %s: %s%s",
            w.name,
            w.exit_status,
            d.why,
            f" in {d.delay:.1f}s" if d.delay else "",
        )
        self._later(w.name, reason, d.delay)

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
            again = self.auto_restore(name, reason)
        except Exception as e:
            log.exception("automatic restore of %s failed unexpectedly", name)
            w = self.engine.registry.find(name)
            if w is not None and not w.alive():
                self.engine.fail(w, f"automatic restore failed unexpectedly: {e!r}")
            return
        if again:
            # Storage down or a PID/port taken: the checkpoints are fine. Try the same again,
            # backing off as in a crash loop, without limit: giving up would lose the state.
            # The count lives in the streak: `status` shows it, and a restart continues it.
            w = self.engine.registry.find(name)
            if w is None:
                return
            w.streak, delay = retry_later(w.restore, w.streak)
            log.warning(
                "restore of %s will be tried again in %.1fs (retry %d)",
                name,
                delay,
                w.streak.retries,
            )
            self._later(name, reason, delay)


def _restored_from(w: Workload) -> str | None:
    """The checkpoint the workload's tree was last restored from, per its history (None: it
    was cold-started, or its history holds no restore)."""
    for attempt in reversed(w.history):
        if attempt.result is RestoreResult.OK:
            return attempt.checkpoint
    return None
