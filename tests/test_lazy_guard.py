"""The lazy restore's guard, for real (CRIU as root): it holds every userfaultfd of the tree
(whatever number it gets), learns the tree from CRIU before it resumes, follows processes
that leave the tree, and the service notices when it dies (the tree is then killed, as this
host's failure, not the checkpoint's).

The daemon killed -9 during a lazy restore, through the real daemon: test_lazy_restore_daemon_kill.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.criu import Criu, CriuError, DumpOptions
from checkpointer.criu.lazy import LazyRestore, prepare_restore_dir
from checkpointer.criu.lazy.uffd_hold import UffdHold
from checkpointer.host import children
from checkpointer.workloads.process import descendants, is_alive, teardown
from tests.support import free_port, require_root_and_criu
from tests.support.lazy import (
    CountingSource,
    Dump,
    FailableSource,
    ask,
    gone,
    launch_in_namespace,
    lazily_restored,
    pausing_criu,
    restore_dir,
    service_reaper,
)
from tests.support.paths import PROGRAMS

MB = 100
SEED = 20261207
SERVER = [sys.executable, str(PROGRAMS / "daemonizing_server.py")]


@pytest.fixture(scope="module")
def reaper() -> Iterator[dict[int, int]]:
    with service_reaper() as exits:
        yield exits


def dump_of(reaper: dict[int, int], kind: str) -> Iterator[Dump]:
    """The daemonizing server dumped: "managed" as PID 1 of its own PID namespace (as
    `checkpointer run` starts it), "adopted" in the host's (as `register --pid` finds it)."""
    work = Path(tempfile.mkdtemp(prefix=f"ckpt-guard-{kind}-"))
    try:
        os.chmod(work, 0o700)
        criu = Criu("criu", work / "failed-logs", timeout=120)
        port = free_port()
        argv = [*SERVER, str(port), str(MB), str(SEED)]
        proc = None
        if kind == "managed":
            pid = launch_in_namespace(argv)
        else:
            proc = children.spawn(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            pid = proc.pid
        try:
            expected = ask(port, b"peek").decode().strip()
            images = work / "dump"
            images.mkdir(mode=0o700)
            criu.dump(pid, images, DumpOptions(), f"guard-{kind}")
        finally:
            if proc is not None:
                children.reap(proc, kill=True)  # its PID free again for the restore
            assert teardown(pid, None) == []
        yield Dump(images, work, port, criu, expected, reaper)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def managed(reaper: dict[int, int]) -> Iterator[Dump]:
    yield from dump_of(reaper, "managed")


@pytest.fixture(scope="module")
def adopted(reaper: dict[int, int]) -> Iterator[Dump]:
    yield from dump_of(reaper, "adopted")


def stalling_source(d: Dump, after_mb: int, release: threading.Event) -> CountingSource:
    """The dump's pages; from `after_mb` on, a read waits for `release` (a minute at most)."""

    def stall(sent: int) -> None:
        if sent >= after_mb * 256:
            release.wait(60)

    return CountingSource(d.images, stall)


def guards() -> list[int]:
    """The lazy restore guards this process started (found as a person would: by name)."""
    found = []
    for p in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if b"checkpointer.criu.lazy.guard" in Path(f"/proc/{p}/cmdline").read_bytes():
                found.append(p)
    return found


# ---------------------------------------------------------------------------------------
# The copies of the userfaultfds


USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
HOLDER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "close":
        os.close(int(words[1]))
    print(libc.syscall({USERFAULTFD}, os.O_CLOEXEC), flush=True)
"""


def test_a_userfaultfd_that_reuses_a_closed_ones_number_is_held_too() -> None:
    """`criu lazy-pages` closes the userfaultfd of a process that exited and gets a new one
    for the next fork, often under the same number: held by number, the new one was never
    copied, and the forked process read zeros once `criu lazy-pages` was gone."""
    require_root_and_criu()
    assert USERFAULTFD is not None, (
        f"userfaultfd's syscall number on {platform.machine()} is not known to this test: add it"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    hold = None
    try:

        def say(line: str) -> int:
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.write(line + "\n")
            holder.stdin.flush()
            return int(holder.stdout.readline())

        first = say("open")
        assert first >= 0
        hold = UffdHold(holder.pid)
        assert hold.refresh() == 1
        second = say(f"close {first}")
        assert second == first, "the number was not reused: the test proves nothing"
        assert hold.refresh() == 2, "the new userfaultfd behind an old number was not copied"
        assert hold.refresh() == 2  # and each is copied once
    finally:
        if hold is not None:
            hold.release()
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------
# The guard, with real CRIU


@pytest.mark.parametrize("kind", ["adopted", "managed"])
def test_a_daemon_started_during_the_transfer_dies_with_the_tree_when_it_fails(
    kind: str, adopted: Dump, managed: Dump
) -> None:
    """The tree starts a daemon (double fork: it leaves the root's subtree) while its pages
    arrive, then a page fails verification. The daemon must die with the tree: left running,
    it would read zeros for every page still missing. Managed trees die whole with their PID
    namespace; an adopted tree is in a cgroup of its own during the transfer."""
    d = adopted if kind == "adopted" else managed  # both set up before the test's leak check
    fail = threading.Event()
    dport = free_port()
    daemon_pid = None
    try:
        source = FailableSource(d.images, fail)  # 10 s of transfer
        with lazily_restored(d, f"lazy-daemonize-{kind}", source) as (lr, _):
            assert lr.pid is not None
            assert ask(d.port, f"daemonize {dport}".encode()) == b"ok\n"
            daemon_pid = int(ask(dport, b"pid"))
            if kind == "adopted":
                assert daemon_pid not in descendants(lr.pid), "it did not leave the tree"
            stats = lr.stats()
            assert stats is not None and not stats.closed, "the transfer ended too soon"
            fail.set()
            answer = ask(dport, b"peek", timeout=30)
            assert answer in (b"", d.expected.encode() + b"\n"), "the daemon read zeros"
            assert lr.wait(30) and lr.failed(), lr.reason
            assert gone(daemon_pid, 5), "the daemon that left the tree still runs"
            assert gone(lr.pid, 5)
            if kind == "adopted":  # our child now (subreaper): killed by us, not crashed
                status = _exit_status(d.exits, daemon_pid)
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        if daemon_pid is not None and is_alive(daemon_pid):
            os.kill(daemon_pid, signal.SIGKILL)


def _exit_status(exits: dict[int, int], pid: int) -> int:
    """The wait status the reaper saw for `pid` (it records it right after reaping)."""
    deadline = time.monotonic() + 5
    while pid not in exits:
        assert time.monotonic() < deadline, f"{pid} was not reaped by the service's reaper"
        time.sleep(0.01)
    return exits[pid]


def test_a_guard_killed_mid_transfer_fails_the_restore_as_the_hosts_fault(
    managed: Dump,
) -> None:
    """Without its guard, a daemon killed now would leave the tree on zero pages: the service
    notices at once (not after the 30 s stall watchdog), kills the tree and says the host
    failed, not the checkpoint (the engine then restores the same checkpoint again)."""
    release = threading.Event()
    try:
        source = stalling_source(managed, 10, release)
        with lazily_restored(managed, "lazy-guard-dies", source) as (lr, _):
            assert lr.pid is not None
            answers: list[bytes] = []
            asker = threading.Thread(target=lambda: answers.append(ask(managed.port, b"peek")))
            asker.start()
            time.sleep(0.5)  # the tree now waits for a page the source will not give
            [guard] = guards()
            killed_at = time.monotonic()
            os.kill(guard, signal.SIGKILL)
            assert lr.wait(10) and lr.failed()
            assert time.monotonic() - killed_at < 5, "noticed by the stall watchdog only"
            assert lr.reason is not None and "guard" in lr.reason, lr.reason
            assert lr.host_fault == lr.reason
            asker.join(40)
            assert answers == [b""], f"the tree answered {answers} without its pages"
            assert gone(lr.pid, 5)
            status = _exit_status(managed.exits, lr.pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        release.set()


def test_a_tree_whose_guard_is_gone_before_it_resumes_never_runs(managed: Dump) -> None:
    """CRIU pauses at post-restore (a script of the test's, before ours); the guard is killed
    meanwhile. The hook then cannot hand the tree over, CRIU kills it and the restore fails as
    the host's fault: the tree never ran, so it never ran unguarded."""
    wrapper, mark = pausing_criu(managed.work, "before-resume")
    criu = Criu(str(wrapper), managed.work / "failed-logs", timeout=120)
    rdir = restore_dir(managed, "lazy-guard-gone")
    source = CountingSource(managed.images)
    index = prepare_restore_dir(rdir, source)
    killer = threading.Thread(target=_kill_guard_when, args=(mark,))
    killer.start()
    lr = None
    try:
        with pytest.raises(CriuError) as failed:
            lr = LazyRestore.start(criu, rdir, index, source, DumpOptions(), "lazy-guard-gone")
        assert failed.value.category == "lazy-guard-lost", failed.value
        assert "guard" in str(failed.value)
        root = int(mark.read_text())
        assert gone(root, 10), "CRIU did not kill the tree"
        with pytest.raises(ConnectionRefusedError):
            ask(managed.port, b"peek", timeout=1)
    finally:
        killer.join(30)
        if lr is not None:  # restored after all: not protected, but not left behind either
            lr.abort("test over")
            lr.wait(30)
            assert lr.pid is not None and teardown(lr.pid, None) == []
        source.close()
        mark.unlink(missing_ok=True)


def _kill_guard_when(mark: Path) -> None:
    deadline = time.monotonic() + 60
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    for guard in guards():
        os.kill(guard, signal.SIGKILL)


def test_the_guard_lets_go_once_every_page_arrived(managed: Dump) -> None:
    """The tree then owns all its memory: nothing is held for it any more."""
    with lazily_restored(managed, "lazy-guard-ok", CountingSource(managed.images)) as (lr, _):
        assert ask(managed.port, b"peek").decode().strip() == managed.expected
        assert lr.wait(60) and lr.done(), lr.reason
        assert guards() == [], "the guard did not exit after the last page"
