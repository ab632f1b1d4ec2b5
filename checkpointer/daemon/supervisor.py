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

from checkpointer import hostinfo
from checkpointer.engine import Engine, Workload
from checkpointer.restore_policy import Streak, on_death
from checkpointer.workloads import process
from checkpointer.workloads.reaper import Reaper
from checkpointer.workloads.watcher import ExitWatcher

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reaper = Reaper(self._on_reaped)
        self.watcher = ExitWatcher(lambda pid: self._on_death(pid, None))
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()
        self._stopping = False
        engine.on_new_pid = self.track

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
        booted = self.engine.previous_boot_id not in (None, hostinfo.boot_id())
        for w in self.engine.workloads():
            if w.state != "running" and w.state not in ("stopping", "restoring", "crashed"):
                continue
            if w.state == "running" and w.alive() and not booted:
                log.info("workload %s re-adopted: pid %d still runs", w.name, w.pid)
                self.track(w)
                continue
            reason = "boot" if booted else "crash"
            w.state = "crashed"
            w.exit_status = (
                "the host rebooted" if booted else "gone while the daemon was not running"
            )
            w.streak = {}  # a new boot or a long gap is not a crash loop
            self._decide(w, reason)

    def bring_back(self, w: Workload, why: str) -> None:
        """A declared workload that is registered but stopped: restore its latest checkpoint
        (or cold-start it), as after a boot."""
        w.state, w.exit_status, w.streak = "crashed", why, {}
        self._decide(w, "boot")

    def _on_reaped(self, pid: int, status: int) -> None:
        self._on_death(pid, status)

    def _on_death(self, pid: int, status: int | None) -> None:
        if self._stopping:
            return
        w = self.engine.mark_dead(pid, status)
        if w is not None:
            self._decide(w, "crash", clean=status == 0)

    def _decide(self, w: Workload, reason: str, clean: bool = False) -> None:
        streak = Streak(**w.streak) if w.streak else Streak()
        d = on_death(w.policy(), streak, time.time(), clean)
        w.streak = {
            "attempts": d.streak.attempts,
            "depth": d.streak.depth,
            "last_restore_at": d.streak.last_restore_at,
        }
        if d.action == "ignore":
            log.info("workload %s: %s", w.name, d.why)
            self.engine.save()
            return
        if d.action == "give_up":
            self.engine.fail(w, d.why)
            return
        w.state = "restoring"
        self.engine.save()
        log.warning(
            "workload %s %s: %s%s",
            w.name,
            w.exit_status,
            d.why,
            f" in {d.delay:.1f}s" if d.delay else "",
        )
        timer = threading.Timer(d.delay, self._restore, args=(w.name, reason))
        timer.daemon = True
        with self._lock:
            old = self._timers.pop(w.name, None)
            if old:
                old.cancel()
            self._timers[w.name] = timer
        timer.start()

    def _restore(self, name: str, reason: str) -> None:
        with self._lock:
            self._timers.pop(name, None)
        if self._stopping:
            return
        try:
            self.engine.auto_restore(name, reason)
        except Exception:
            log.exception("automatic restore of %s failed unexpectedly", name)
