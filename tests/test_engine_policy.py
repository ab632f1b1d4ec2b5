"""The engine's restore policy paths with a fake CRIU and a real local repository.

Reaching these with real CRIU is slow or needs a broken host (a PID taken, a MemoryError in the
middle of a rebuild); here the fake CRIU fails exactly as told, the repository, the registry
and the policy are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import checkpointer.daemon.supervisor as supervision
import checkpointer.engine.facade as facade
from checkpointer.config import WorkloadOptions, load_config
from checkpointer.criu import CriuError, DumpOptions, DumpStats, RestoreStats
from checkpointer.daemon.main import services
from checkpointer.daemon.supervisor import Supervisor
from checkpointer.engine import Engine, Hooks, Workload, WorkloadState
from checkpointer.engine.events import Silent
from checkpointer.engine.recovery import Fresh, Recovery
from checkpointer.errors import RestoreFailed
from checkpointer.workloads.logs import LogPump
from storage import Repository
from storage.backends import LocalBlobStore

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


class FakeCriu:
    """Dumps a few pages that differ per dump; restores by starting `sleep`, or fails with
    the next exception queued in `failures`."""

    def __init__(self) -> None:
        self.failures: list[BaseException | None] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dumps = 0

    def version(self) -> str:
        return "4.2.1"

    def exe(self) -> str:
        return "criu"

    def run_logged(self, cmd: list[str], log: Path, label: str, op: str) -> None:
        """Other CRIU commands (the cpuinfo dump after a checkpoint): nothing to record."""

    def dump(
        self, pid: int, images: Path, options: DumpOptions, label: str, final: bool = False
    ) -> DumpStats:
        self.dumps += 1
        (images / "pages-1.img").write_bytes(bytes([self.dumps]) * 4096 * 4)
        (images / "core-1.img").write_bytes(b"core")
        return DumpStats(0.001, 0.01, 0.005, 0.004, 4, 4)

    def restore(
        self, images: Path, options: DumpOptions, label: str, inherit: object = ()
    ) -> tuple[int, RestoreStats]:
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        assert (images / "pages-1.img").exists()
        self.procs.append(sleeper())
        return self.procs[-1].pid, RestoreStats(0.001, 0.01, 4)


class Schedule:
    def schedule(self, *args: object) -> None:
        pass

    def unschedule(self, name: str) -> None:
        pass

    def next_run(self, name: str) -> None:
        return None


def sleeper() -> subprocess.Popen[bytes]:
    """A stand-in tree, reaped the moment it dies (as the daemon's reaper would)."""
    proc = subprocess.Popen(["sleep", "300"])
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Engine, FakeCriu, list[tuple[str, str]]]]:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"state_dir: {tmp_path / 'state'}\ncriu:\n  scratch_dir: {tmp_path / 'scratch'}\n"
    )
    config = load_config(config_file)
    config.state_dir.mkdir(mode=0o700)
    criu = FakeCriu()
    downs: list[tuple[str, str]] = []
    repo = Repository(LocalBlobStore(tmp_path / "repo"), 2, 3600.0)
    engine = Engine(
        config,
        repo,
        criu,  # type: ignore[arg-type]
        LogPump(),
        Silent(),
        Schedule(),  # type: ignore[arg-type]
        Hooks(down=lambda w, reason: downs.append((w.name, reason))),
    )
    try:
        yield engine, criu, downs
    finally:
        for p in criu.procs:
            p.kill()
            p.wait()


def adopted_with_checkpoints(engine: Engine, n: int) -> tuple[Workload, list[str]]:
    proc = sleeper()
    FakeCriuProcs.append(proc)
    w = services(engine).registering.register("app", pid=proc.pid, options=WorkloadOptions())
    ids = [engine.checkpoint("app")["id"] for _ in range(n)]
    return w, ids[::-1]  # newest first


FakeCriuProcs: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap_sleepers() -> Iterator[None]:
    yield
    while FakeCriuProcs:
        p = FakeCriuProcs.pop()
        p.kill()
        p.wait()


def crash(engine: Engine, w: Workload) -> None:
    assert w.pid is not None
    os.kill(w.pid, 9)
    while w.alive():
        time.sleep(0.01)
    assert engine.mark_dead(w.pid, 9) is w
    assert w.state is WorkloadState.CRASHED


def test_a_pid_in_use_is_retried_and_marks_no_checkpoint_bad(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    engine, criu, _ = setup
    w, ids = adopted_with_checkpoints(engine, 2)
    crash(engine, w)
    criu.failures = [CriuError("criu restore failed: pid 7 in use", "pid-in-use")]
    assert services(engine).recovery.auto_restore("app", "crash") is True  # try again later
    assert w.bad_checkpoints == [] and not w.alive()
    assert w.history[-1].result == "retry" and w.history[-1].checkpoint == ids[0]
    assert services(engine).recovery.auto_restore("app", "crash") is False
    assert w.alive() and w.history[-1].checkpoint == ids[0]  # the newest, not an older one


def test_an_unexpected_exception_marks_the_checkpoint_bad_and_steps_back(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    engine, criu, _ = setup
    w, ids = adopted_with_checkpoints(engine, 2)
    crash(engine, w)
    criu.failures = [MemoryError("declared size 8 TiB")]
    assert services(engine).recovery.auto_restore("app", "crash") is False
    assert w.bad_checkpoints == [ids[0]]
    assert w.alive() and w.state is WorkloadState.RUNNING
    assert w.history[-1].checkpoint == ids[1] and w.history[-1].result == "ok"


def test_a_checkpoint_that_cannot_restore_is_marked_bad_but_the_policy_goes_on(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    engine, criu, _ = setup
    w, ids = adopted_with_checkpoints(engine, 3)
    crash(engine, w)
    criu.failures = [CriuError("bad image", "unknown"), ValueError("odd digest list")]
    assert services(engine).recovery.auto_restore("app", "crash") is False
    assert w.bad_checkpoints == ids[:2] and w.history[-1].checkpoint == ids[2] and w.alive()


def test_rollback_failing_after_the_stop_hands_the_workload_to_the_policy(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    engine, criu, downs = setup
    w, ids = adopted_with_checkpoints(engine, 2)
    criu.failures = [CriuError("bad image", "unknown")]
    with pytest.raises(Exception, match="restores its newest good checkpoint"):
        services(engine).recovery.rollback("app", back=1)
    assert w.state is WorkloadState.CRASHED and downs == [("app", "rollback")]
    assert w.bad_checkpoints == [ids[1]]
    # What the supervisor then does: the newest good checkpoint comes back.
    assert services(engine).recovery.auto_restore("app", "rollback") is False
    assert w.alive() and w.history[-1].checkpoint == ids[0]


def test_the_registry_survives_a_restart_of_the_engine(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    engine, _, _ = setup
    w, ids = adopted_with_checkpoints(engine, 1)
    engine.registry.save()
    again = type(engine.registry)(engine.registry.path)
    (loaded,) = again.load()
    assert loaded.name == "app" and loaded.pid == w.pid and loaded.kind == w.kind
    assert loaded.last_checkpoint == ids[0] and loaded.kept is not None
    assert loaded.kept.intact() and loaded.retention == w.retention


def test_the_policy_decides_under_the_workloads_lock(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    """Supervisor.decide changed the state and streak of a workload without its lock, under
    an operation that held it (a rollback, a checkpoint): the decision now waits for it."""
    engine, _, _ = setup
    w, _ = adopted_with_checkpoints(engine, 1)
    crash(engine, w)
    supervisor = Supervisor(engine, services(engine).recovery)
    try:
        with engine.locked(w, wait=True):
            supervisor.decide(w, "crash")
            time.sleep(1.0)
            assert w.state is WorkloadState.CRASHED, "decided without the workload's lock"
            assert w.streak.attempts == 0
        # The timer's restore, waited for: one still running at teardown would start its
        # `sleep` after the fixture has killed the others.
        assert until(lambda: restored(w)), w.state
        assert w.streak.attempts == 1
    finally:
        supervisor.stop()


# -- the supervisor's own calls never end on a busy lock -------------------------------------


def until(ready: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def restored(w: Workload) -> bool:
    return w.state is WorkloadState.RUNNING and w.alive()


@pytest.fixture
def lock_timeout_short(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The workload's lock given up after 0.3 s instead of 600 s; what escapes a thread."""
    monkeypatch.setattr(facade, "MANUAL_LOCK_TIMEOUT", 0.3)
    monkeypatch.setattr(supervision, "BUSY_AGAIN", 0.05)
    uncaught: list[tuple[str, str]] = []

    def seen(a: threading.ExceptHookArgs) -> None:
        uncaught.append((str(a.thread.name if a.thread else None), a.exc_type.__name__))

    monkeypatch.setattr(threading, "excepthook", seen)
    return uncaught


def test_a_death_while_its_lock_is_held_past_the_timeout_is_still_decided(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]], lock_timeout_short: list[object]
) -> None:
    """A tree dies while a drill's rebuild or a long upload holds its lock past the timeout:
    the decision is tried again, not lost (it was: `crashed` for good, no timer, no alert)."""
    engine, _, _ = setup
    w, ids = adopted_with_checkpoints(engine, 1)
    supervisor = Supervisor(engine, services(engine).recovery)
    try:
        pid = w.pid
        assert pid is not None
        os.kill(pid, 9)
        assert until(lambda: not w.alive())
        with engine.locked(w, wait=True):
            supervisor._on_death(pid, 9)  # what the reaper calls
            time.sleep(1.0)  # three timeouts
            assert w.state is WorkloadState.CRASHED
        assert until(lambda: restored(w)), w.state
        assert w.history[-1].checkpoint == ids[0] and lock_timeout_short == []
    finally:
        supervisor.stop()


@dataclass
class Down:
    """A workload whose tree died, decided `restoring` by the policy, and its supervisor."""

    engine: Engine
    w: Workload
    newest: str
    recovery: Recovery
    supervisor: Supervisor
    uncaught: list[tuple[str, str]]


@pytest.fixture
def down(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
    lock_timeout_short: list[tuple[str, str]],
) -> Iterator[Down]:
    engine, _, _ = setup
    w, ids = adopted_with_checkpoints(engine, 1)
    crash(engine, w)
    recovery = services(engine).recovery
    supervisor = Supervisor(engine, recovery)
    assert recovery.on_down("app", "crash") == 0.0  # `restoring`, at once
    try:
        yield Down(engine, w, ids[0], recovery, supervisor, lock_timeout_short)
    finally:
        supervisor.stop()


@contextmanager
def restoring_while_busy(d: Down) -> Iterator[None]:
    """The timer's restore starts while another operation holds the lock past its timeout."""
    with d.engine.locked(d.w, wait=True):
        d.supervisor.restore_soon(d.w, "crash")
        yield


def test_a_restore_that_finds_the_lock_busy_is_tried_again(down: Down) -> None:
    """The timer's restore waits past the timeout: tried again, not left `restoring` (it was,
    when the failure handling found the lock busy as well)."""
    with restoring_while_busy(down):
        time.sleep(1.0)
        assert down.w.state is WorkloadState.RESTORING and not down.w.alive()
    assert until(lambda: restored(down.w)), down.w.state
    assert down.w.history[-1].checkpoint == down.newest and down.uncaught == []


def test_a_storage_outage_then_a_busy_lock_does_not_end_the_retries(down: Down) -> None:
    """auto_restore says "try again" (storage down), then its back-off finds the lock busy:
    the retries go on (they ended: `restoring` for good, nothing scheduled)."""
    outage = [True]
    real = down.recovery.auto_restore

    def storage_down_once(name: str, reason: str) -> bool:
        return outage.pop() if outage else real(name, reason)

    down.recovery.auto_restore = storage_down_once  # type: ignore[method-assign]
    with restoring_while_busy(down):
        time.sleep(1.0)
        assert not outage and down.w.state is WorkloadState.RESTORING
    assert until(lambda: restored(down.w)), down.w.state
    assert down.w.history[-1].checkpoint == down.newest and down.uncaught == []


def test_an_unexpected_error_fails_the_workload_even_while_its_lock_is_busy(down: Down) -> None:
    """The automatic restore raises what it should not; the failure handling then finds the
    lock busy past the timeout: the workload fails all the same (the restore-failed alert)."""

    def bug(name: str, reason: str) -> bool:
        raise RuntimeError("a bug in the restore path")

    down.recovery.auto_restore = bug  # type: ignore[method-assign]
    with restoring_while_busy(down):
        assert until(lambda: down.w.state is WorkloadState.FAILED, 5.0), down.w.state
    assert "a bug in the restore path" in (down.w.failed_reason or "")
    assert down.uncaught == []


def test_a_failed_rollback_reports_its_failure_while_the_lock_is_busy(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]], lock_timeout_short: list[object]
) -> None:
    """A rollback fails after the stop, and another operation takes the lock as it lets go:
    the user still gets the RestoreFailed (it was replaced by WorkloadBusy), and the policy
    restores the newest good checkpoint once the lock is free."""
    engine, criu, _ = setup
    w, ids = adopted_with_checkpoints(engine, 2)
    recovery = services(engine).recovery
    supervisor = Supervisor(engine, recovery)
    held, done = threading.Event(), threading.Event()

    def operation() -> None:
        with engine.locked(w, wait=True):
            held.set()
            done.wait(10)

    def down(w: Workload, reason: str) -> None:
        threading.Thread(target=operation, daemon=True).start()
        assert held.wait(5)
        supervisor.decide(w, reason)

    recovery.hooks = Hooks(down=down)
    criu.failures = [CriuError("bad image", "unknown")]
    try:
        with pytest.raises(RestoreFailed, match="restores its newest good checkpoint"):
            recovery.rollback("app", back=1)
        time.sleep(1.0)
        assert w.state is WorkloadState.CRASHED
        done.set()
        assert until(lambda: restored(w)), w.state
        assert w.history[-1].checkpoint == ids[0] and lock_timeout_short == []
    finally:
        done.set()
        supervisor.stop()


# -- the decisions at the daemon's start ------------------------------------------------------


class WatchedLock:
    """The workload's lock, telling when a second thread waits for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waited = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.lock.locked():
            self.waited.set()
        return self.lock.acquire(blocking, timeout)

    def release(self) -> None:
        self.lock.release()


def test_a_manual_restore_during_the_start_decision_is_not_restored_over(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    """The daemon starts and finds the tree gone while `checkpointer restore` brings it back
    under the workload's lock: the start-up decision, once it has the lock, leaves the running
    tree alone (it marked it `restoring` for good: never checkpointed, never restored again)."""
    engine, criu, _ = setup
    w, ids = adopted_with_checkpoints(engine, 1)
    crash(engine, w)
    recovery = services(engine).recovery
    supervisor = Supervisor(engine, recovery)
    w.lock = WatchedLock()  # type: ignore[assignment]
    in_restore, go = threading.Event(), threading.Event()
    real_restore = criu.restore

    def held_restore(*args: object, **kwargs: object) -> tuple[int, RestoreStats]:
        in_restore.set()  # under the manual restore's lock
        assert go.wait(10)
        return real_restore(*args, **kwargs)  # type: ignore[arg-type]

    criu.restore = held_restore  # type: ignore[method-assign]
    manual = threading.Thread(target=recovery.restore, args=("app",), daemon=True)
    starting = threading.Thread(target=supervisor.recover_at_start, daemon=True)
    try:
        manual.start()
        assert in_restore.wait(10)
        starting.start()  # finds it `crashed`, decides: waits for the lock
        assert w.lock.waited.wait(10)
        go.set()
        manual.join(10)
        starting.join(10)
        assert not manual.is_alive() and not starting.is_alive()
        time.sleep(0.5)  # a restore the decision would have scheduled (at once)
        assert w.state is WorkloadState.RUNNING and w.alive()
        assert len(criu.procs) == 1 and w.pid == criu.procs[0].pid  # one copy: the manual one
        assert w.history[-1].reason == "manual" and w.history[-1].checkpoint == ids[0]
        assert w.history[-1].result == "ok"
    finally:
        go.set()
        supervisor.stop()


def test_the_start_decision_restores_only_a_state_unchanged_since_it_was_seen(
    setup: tuple[Engine, FakeCriu, list[tuple[str, str]]],
) -> None:
    """A restore interrupted by the daemon's stop (`restoring` then, `restoring` now) is
    restored; a stopped workload a take-over made `restoring` meanwhile is left to it."""
    engine, _, _ = setup
    w, _ = adopted_with_checkpoints(engine, 1)
    crash(engine, w)
    recovery = services(engine).recovery
    w.state = WorkloadState.RESTORING
    why = "gone while the daemon was not running"
    assert recovery.on_down("app", "crash", fresh=Fresh(why, WorkloadState.RESTORING)) == 0.0
    assert w.state is WorkloadState.RESTORING and w.exit_status == why
    w.exit_status = "failover to this host"  # Migration.take_over's, after a `stopped` was seen
    assert recovery.on_down("app", "boot", fresh=Fresh("stop", WorkloadState.STOPPED)) is None
    assert w.state is WorkloadState.RESTORING and w.exit_status == "failover to this host"
