"""One lazy restore in flight (`LazyRestore`): the tree runs as soon as CRIU has rebuilt it,
and the restore is over when the rest of its memory has arrived, or the tree is dead.

What can go wrong, and what this module does about it (each one seen in the prototype):
- The page server cannot deliver a page (fetch or verification failed): CRIU's protocol has no
  error answer (answering 0 pages hangs the daemon), so we close the connection; the daemon
  then exits 1. Its userfaultfds close with it, and the kernel would fill every missing page
  with ZEROES: the tree would keep running on wrong memory. So we hold copies of the daemon's
  userfaultfds (pidfd_getfd): with them open, a missing page blocks the faulting thread
  instead. On failure we SIGKILL the tree, wait until it is dead, and only then let the
  copies go. After a clean end (daemon exit 0) we let them go at once: a fault in a range the
  tree later discards (MADV_DONTNEED) would otherwise wait forever.
- The daemon waits forever for an answer (no timeout in CRIU): a stall watchdog fails the
  restore when a request stays unanswered, or nothing moves, for `stall_timeout` seconds.
- This process dies (kill -9, OOM), at any moment of the restore: a guard process
  (guard_process) starts `criu lazy-pages` (and ends it), holds the page server's connection
  and the copies too, learns the tree from CRIU before it runs (and puts an adopted one in a
  cgroup of its own), and kills it. A guard that dies is seen here at the next tick: the
  tree is killed and the restore fails as this host's fault (`host_fault`), not the
  checkpoint's, so it is tried again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from checkpointer.criu.driver import Criu, restore_log
from checkpointer.criu.failures import CriuError, CriuFailure
from checkpointer.criu.images.stats import RestoreStats, read_restore_stats
from checkpointer.criu.lazy.guard_process import GuardProcess
from checkpointer.criu.lazy.page_server import PageServer, TransferStats
from checkpointer.criu.lazy.pages_daemon import LazyPagesDaemon
from checkpointer.criu.lazy.preparation import (
    NoPagesYet,
    PageIndex,
    PageSource,
    check_private_dir,
)
from checkpointer.criu.lazy.restored_tree import RestoredTree
from checkpointer.criu.lazy.uffd_hold import UffdHold
from checkpointer.criu.options import DumpOptions

log = logging.getLogger(__name__)

_TICK = 0.05
# Test hook: with this variable naming a file, `begin` writes it and waits there for a minute
# once `criu lazy-pages` is started (tests/test_lazy_pages_orphan.py kills the daemon then).
PAUSE_AFTER_LAZY_PAGES = "CHECKPOINTER_TEST_PAUSE_AFTER_LAZY_PAGES"


class LazyRestore:
    """One lazy restore in flight: the restored root's `pid`, and whether the rest of its
    memory arrived (`done`) or not (`failed`, `reason`; the tree is then killed).

    Start it with `LazyRestore.start`. A monitor thread watches the daemon, the page server and
    the stall watchdog; `on_finish` (optional) is called once, from that thread, at the end."""

    def __init__(self, criu: Criu, images_dir: Path, label: str, stall_timeout: float) -> None:
        self.criu = criu
        self.images_dir = images_dir
        self.label = label
        self.stall_timeout = stall_timeout
        self.pid: int | None = None
        self.restore_stats: RestoreStats | None = None
        # Seconds to the lazy-pages daemon's readiness, and of `criu restore` (the log says).
        self.started_in: tuple[float, float] = (0.0, 0.0)
        self._ready_in = 0.0
        self._ready_timeout = 30.0
        self.on_finish: Callable[[LazyRestore], None] | None = None
        self.kept_log: Path | None = None  # the daemon's CRIU log, kept when it failed
        self._reason: str | None = None
        # Why the restore failed if it was this host's fault, not the checkpoint's nor the
        # storage's (the guard died): the same checkpoint may be restored again.
        self.host_fault: str | None = None
        self._done = False
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._tree = RestoredTree()
        self._restore_log = restore_log(images_dir)
        self._server: PageServer | None = None
        self._daemon: LazyPagesDaemon | None = None
        self._hold: UffdHold | None = None
        self._guard: GuardProcess | None = None

    # The caller's view -------------------------------------------------------------------

    def done(self) -> bool:
        """Every page was delivered and the daemon exited 0: the tree owns all its memory."""
        return self._done

    def failed(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or failed (and, if failed, the tree is dead); False on timeout."""
        return self._finished.wait(timeout)

    def stats(self) -> TransferStats | None:
        return self._server.stats() if self._server else None

    @property
    def daemon_pid(self) -> int | None:
        """The `criu lazy-pages` process (for diagnostics; it is this object's to end)."""
        return self._daemon.pid if self._daemon else None

    def abort(self, reason: str = "lazy restore aborted") -> None:
        """Fail the restore now (the service is stopping, the operator asked): kills the tree.
        Does nothing once `done`: the tree then owns its memory and is an ordinary tree."""
        self._fail(reason)

    # Start -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        criu: Criu,
        images_dir: Path,
        index: PageIndex,
        source: PageSource,
        opts: DumpOptions,
        label: str,
        *,
        inherit: Sequence[tuple[int, str]] = (),
        stall_timeout: float = 30.0,
        ready_timeout: float = 30.0,
        on_finish: Callable[[LazyRestore], None] | None = None,
    ) -> LazyRestore:
        """Start the daemon and the page server, restore the tree from `images_dir` (made by
        `prepare_restore_dir`, mode 0700), and return as soon as the tree runs. Raises
        CriuError if the tree could not be restored (nothing is left running then).

        `opts` and `inherit` are those of `Criu.restore`; `criu.timeout` bounds the restore
        command. `stall_timeout`: a request unanswered, or no request while pages are still
        missing, for that long fails the restore. `ready_timeout`: for the daemon to listen.
        `on_finish` runs once, on the monitor thread, when the restore is done or failed."""
        self = cls.begin(criu, images_dir, label, stall_timeout, ready_timeout)
        self.run(index, source, opts, inherit=inherit, on_finish=on_finish)
        return self

    @classmethod
    def begin(
        cls,
        criu: Criu,
        images_dir: Path,
        label: str,
        stall_timeout: float = 30.0,
        ready_timeout: float = 30.0,
    ) -> LazyRestore:
        """`start` in two halves: the lazy-pages daemon now, on a folder that holds so far
        the inventory and the process tree (what the daemon reads before the restore connects
        to it: lazy_pages_prepare_pstree in criu/uffd.c), then `run` once the caller has put
        the other images there, or `cancel`. The daemon's start (~50 ms, measured on 1 GB of
        Redis) then overlaps the caller's own preparing instead of following it: `begin`
        only spawns it, `run` waits until it listens."""
        check_private_dir(images_dir)
        self = cls(criu, images_dir, label, stall_timeout)
        self._server = PageServer(
            PageIndex({}), NoPagesYet(), self._connection_lost, self._grab_uffds
        )
        self._ready_timeout = ready_timeout
        try:
            # The guard starts the daemon, holds the userfaultfds and the connection too, and
            # kills the tree if this process dies before the pages are all there (see
            # guard_process). Started now, it is up (~30 ms of CPU) before CRIU's hook asks
            # for it: started just before `criu restore`, the restore waited for it (measured:
            # 40 ms longer, under load).
            self._daemon = LazyPagesDaemon(
                criu, images_dir, label, self._server.peer, self._server.connection_fd()
            )
            self._guard = self._daemon.guard
            _pause_for_tests()
        except BaseException:
            self.cancel()
            raise
        return self

    def run(
        self,
        index: PageIndex,
        source: PageSource,
        opts: DumpOptions,
        *,
        inherit: Sequence[tuple[int, str]] = (),
        on_finish: Callable[[LazyRestore], None] | None = None,
    ) -> None:
        """The second half of `start` (see `begin`): serve `index` from `source` and
        restore the tree; returns once it runs."""
        assert self._server is not None and self._daemon is not None
        self.on_finish = on_finish
        self._server.index, self._server.source = index, source
        try:
            self._await_daemon(self._ready_timeout)
            self._server.start()
            t1 = time.monotonic()
            self._restore(opts, inherit)
            self.started_in = (self._ready_in, time.monotonic() - t1)
        except BaseException:
            self.cancel()
            raise
        threading.Thread(target=self._monitor, name=f"lazy-{self.label}", daemon=True).start()

    def cancel(self) -> None:
        """Undo `begin` (the restore could not be prepared, or did not start)."""
        self._fail("the restore did not start")
        self._teardown_start()

    def _await_daemon(self, ready_timeout: float) -> None:
        """Wait until the daemon spawned by `begin` listens."""
        assert self._daemon is not None
        try:
            self._ready_in = self._daemon.await_ready(ready_timeout)
            self._hold = UffdHold(self._daemon.pid)  # now: its guard has not reaped it
        except CriuError as e:
            deadline = time.monotonic() + 1.0  # its pipes close a moment before it is a zombie
            while (lost := self._guard_lost()) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if lost is None:
                raise
            self.host_fault = lost  # the guard started it, and died: not the checkpoint's
            raise CriuError(
                f"lazy restore of {self.label}: {lost}", CriuFailure.LAZY_GUARD_LOST, e.log
            ) from e

    def _end_guard(self, kill: bool = False) -> None:
        """The tree owns its memory (the guard lets go), or must die (`kill`: the guard kills
        what it saw of it first)."""
        if self._guard is not None:
            if not self._guard.end(kill):
                log.warning("the guard of the lazy restore of %s did not exit", self.label)
            self._guard = None

    def _guard_lost(self) -> str | None:
        """Why the guard is gone, if it is (it should live until `_end_guard`)."""
        guard = self._guard
        rc = guard.exited() if guard is not None else None
        if guard is None or rc is None:
            return None
        return (
            f"its guard (pid {guard.pid}) exited with status {rc}: nothing would kill the "
            "tree if the daemon died"
        )

    def _restore(self, opts: DumpOptions, inherit: Sequence[tuple[int, str]]) -> None:
        assert self._guard is not None
        try:
            pid = self.criu.restore_tree(
                self.images_dir, opts, self.label, inherit, lazy=True,
                action_script=self._guard.hook,
            )  # fmt: skip
        except CriuError as e:
            lost = self._guard_lost()
            if lost is None:
                raise
            self.host_fault = lost  # CRIU ran its hook without a guard: not the checkpoint's
            raise CriuError(
                f"lazy restore of {self.label}: {lost}", CriuFailure.LAZY_GUARD_LOST, e.log
            ) from e
        self.pid = pid
        with self._lock, contextlib.suppress(ProcessLookupError):  # dead: nothing to kill
            self._tree.adopt(pid)
            self._tree.find_cgroup()  # the guard's (it lets go of it): killed through it too
        self.restore_stats = read_restore_stats(self.images_dir)
        with self._lock:
            if self._reason is not None:  # failed while CRIU ran: the tree must not run
                self._kill_tree()
        self._grab_uffds()
        assert self._server is not None
        self._server.touch()  # the stall watchdog counts from here

    def _teardown_start(self) -> None:
        if self._server:
            self._server.stop()
        if self._daemon:
            self._daemon.stop()
        if self.pid is not None:
            self._wait_tree_dead(10.0)
        self._end_guard(kill=True)  # before our copies go: it may have seen more of the tree
        if self._hold:
            self._hold.release()
        self._close_root()
        self._finished.set()

    # Failure -----------------------------------------------------------------------------

    def _fail(self, reason: str, host_fault: bool = False) -> None:
        """Record the first failure and SIGKILL the tree at once; the monitor finishes."""
        with self._lock:
            if self._reason is not None or self._done:
                return
            self._reason = reason
            if host_fault:
                self.host_fault = reason
            log.warning("lazy restore of %s failed: %s", self.label, reason)
            self._kill_tree()

    def _connection_lost(self, reason: str) -> None:
        """The page server's failure. When `criu lazy-pages` died, its connection closes
        before its guard reports the exit: wait a moment for that status, the more useful
        reason (the tree waits on its missing pages meanwhile: the guard holds them)."""
        deadline = time.monotonic() + 1.0
        while self._daemon is not None and time.monotonic() < deadline:
            rc = self._daemon.poll()
            if rc is not None and rc != 0:
                self._fail(self._daemon.failure(rc))
                return
            if rc == 0:
                break
            time.sleep(0.02)
        self._fail(reason)

    def _kill_tree(self) -> None:
        """SIGKILL the tree, again (see RestoredTree.kill). Call with the lock."""
        self._tree.kill()

    def _tree_dead(self) -> bool:
        with self._lock:
            return self._tree.dead()

    def _wait_tree_dead(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                self._kill_tree()
            if self._tree_dead():
                return True
            time.sleep(0.01)
        return False

    def _close_root(self) -> None:
        with self._lock:
            self._tree.close()

    def _grab_uffds(self) -> None:
        if self._hold is None:
            return
        try:
            self._hold.refresh()
        except OSError as e:
            self._fail(f"cannot hold the userfaultfds of criu lazy-pages: {e}")

    # The monitor thread ------------------------------------------------------------------

    def _monitor(self) -> None:
        try:
            while not self._checked():
                time.sleep(_TICK)
        finally:
            if self.on_finish:
                try:
                    self.on_finish(self)
                except Exception:
                    log.exception("on_finish of the lazy restore of %s failed", self.label)

    def _checked(self) -> bool:
        """`_check`, where an unexpected error fails the restore instead of ending the
        monitor (which alone kills the tree and releases the userfaultfds)."""
        try:
            return self._check()
        except Exception as e:
            log.exception("lazy restore of %s: monitor error", self.label)
            self._fail(f"monitor: {type(e).__name__}: {e}")
            return False

    def _check(self) -> bool:
        """One look at everything; True when the restore has finished (done, or failed with
        the tree dead)."""
        assert self._daemon is not None and self._server is not None
        if self._reason is None:
            rc = self._daemon.poll()
            if rc == 0:
                return self._daemon_exited_cleanly()
            if rc is not None:
                self._fail(self._daemon.failure(rc))
            elif self._server.stalled_for(time.monotonic()) > self.stall_timeout:
                self._fail(f"no page transferred for {self.stall_timeout:.0f}s (stall watchdog)")
            elif (lost := self._guard_lost()) is not None:
                self._fail(lost, host_fault=True)
            else:
                self._grab_uffds()
                with self._lock:
                    self._tree.follow()
                return False
        return self._finish_failed()

    def _daemon_exited_cleanly(self) -> bool:
        assert self._daemon is not None and self._server is not None and self._hold
        self._server.join(5.0)
        if not self._server.stats().closed:
            self._fail("criu lazy-pages exited 0 but never said CLOSE")
            return False
        with self._lock:
            if self._reason is not None:
                return False
            self._done = True
        self._hold.release()  # at once: see the module docstring
        self._end_guard()
        self._close_root()
        self._daemon.end()
        self._restore_log.unlink(missing_ok=True)
        self._finished.set()
        return True

    def _finish_failed(self) -> bool:
        """Kill the tree until it is dead; only then close the connection and the copies."""
        assert self._daemon is not None and self._server is not None and self._hold
        if not self._wait_tree_dead(5.0):
            log.error("lazy restore of %s: the tree does not die; holding its pages", self.label)
            return False
        self._end_guard(kill=True)  # before our copies go: it may have seen more of the tree
        self._hold.release()
        self._close_root()
        self._server.stop(timeout=1.0)
        self.kept_log = self._daemon.stop()
        self._restore_log.unlink(missing_ok=True)
        self._finished.set()
        return True


def _pause_for_tests() -> None:
    mark = os.environ.get(PAUSE_AFTER_LAZY_PAGES)
    if mark:
        Path(mark).write_text(str(os.getpid()))
        time.sleep(60)
