"""Workloads that switch to another user (memcached -u, nginx's workers, PostgreSQL), with real
CRIU as root: what stops CRIU, how far it gets, and the service's init that keeps PID 1 root.

These machines' root lacks CAP_SYS_RESOURCE, without which CRIU cannot read the resource limits
of another user's process ("Can't get rlimit 0"). Where it is missing, the tests assert that
CRIU gets through its parasite in the switched process and stops at exactly that step, and
that the daemon refuses such workloads up front; where it is present (real hosts), they assert
a full checkpoint and restore, state included."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.criu import Criu, CriuError, DumpOptions
from checkpointer.criu.failures import classify
from checkpointer.workloads import managed, process, users
from checkpointer.workloads.launch import INIT_COMMAND
from checkpointer.workloads.logs import LogPump, open_for_workload
from tests.support import COUNTER, PROGRAMS, Daemon, free_port, http_get, kill_tree, serve

SWITCHER = PROGRAMS / "user_switching_counter.py"
INIT = Path(managed.__file__).with_name("init.py")
NOBODY = 65534
REAL_HOST = users.daemon_has(users.CAP_SYS_RESOURCE)


class Trees:
    """Managed trees a test launches (the real launcher), torn down by PID at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fifo = folder / "out.fifo"
        self.log = folder / "out.log"
        self.pump = LogPump()
        self.pump.attach("t", self.fifo, self.log)
        self.roots: list[int] = []
        self.criu = Criu("criu", folder / "failed-logs")

    def launch(self, command: list[str], cwd: Path | None = None) -> int:
        pid = managed.launch("t", command, cwd or self.folder, {}, self.fifo)
        self.roots.append(pid)
        return pid

    def output(self) -> str:
        """What the trees wrote so far, copied by the daemon's own log pump."""
        self.pump.flush()
        return self.log.read_text() if self.log.exists() else ""

    def restore(self, images: Path, label: str) -> int:
        """Restore as the daemon does: this host's FIFO handed in for the dumped one."""
        fd = open_for_workload(self.fifo)
        try:
            pid, _ = self.criu.restore(images, DumpOptions(), label, [(fd, str(self.fifo)[1:])])
        finally:
            os.close(fd)
        self.roots.append(pid)
        return pid

    def close(self) -> None:
        for pid in self.roots:
            kill_tree(pid)
        self.pump.close()


@pytest.fixture
def trees(workdir: Path) -> Iterator[Trees]:
    t = Trees(workdir)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def secret(workdir: Path) -> Path:
    """A file only root may read, in a folder only root may enter."""
    folder = workdir / "private"
    folder.mkdir(mode=0o700)
    path = folder / "secret"
    path.write_text("s3cr3t\n")
    path.chmod(0o600)
    return path


def _images(trees: Trees, name: str) -> Path:
    d = trees.folder / name
    d.mkdir()
    return d


def _uids(pid: int) -> tuple[int, int, int] | None:
    who = users.identity(pid)
    return who.uids if who else None


def _errors(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "Error" in ln and "RLIMIT_NOFILE" not in ln]


@pytest.mark.parametrize(
    ("mode", "crius_error"),
    [
        (0o700, "Can't create a directory (-13)"),  # the config's root-only folder
        (0o1777, "can't dump unprivileged task whose /proc doesn't belong to it"),
    ],
)
def test_a_first_process_that_switched_user_stops_crius_parasite(
    trees: Trees, secret: Path, monkeypatch: pytest.MonkeyPatch, mode: int, crius_error: str
) -> None:
    cwd = trees.folder / "cwd"
    cwd.mkdir()
    cwd.chmod(mode)
    port = free_port()
    pid = trees.launch([sys.executable, str(SWITCHER), str(port), str(secret)], cwd)
    assert http_get(port) == "1"
    assert _uids(pid) == (NOBODY,) * 3
    with pytest.raises(CriuError) as checked:
        trees.criu.dump(pid, _images(trees, "checked"), DumpOptions(), "switcher")
    assert checked.value.category == "switched-user"
    assert checked.value.log is None  # refused before CRIU ran: the tree was never frozen
    assert f"{INIT_COMMAND} COMMAND" in str(checked.value)

    # What the check spares: CRIU itself fails in its parasite, in the tree's first process.
    monkeypatch.setattr(users, "dump_blocker", lambda pid: None)
    with pytest.raises(CriuError) as dumped:
        trees.criu.dump(pid, _images(trees, "dumped"), DumpOptions(), "switcher")
    assert dumped.value.category == "switched-user" and dumped.value.log is not None
    log = dumped.value.log.read_text()
    assert crius_error in log and "Can't get proc fd" in log
    assert not (cwd / "proc.crtools").exists()
    assert http_get(port) == "2"  # left running, as it was


def test_under_the_init_criu_gets_through_the_parasite_of_the_switched_process(
    trees: Trees, secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    root = trees.launch([INIT_COMMAND, sys.executable, str(SWITCHER), str(port), str(secret)])
    assert serve(port, 2) == "2"
    (child,) = process.descendants(root)
    assert _uids(root) == (0, 0, 0)  # the init stays root
    assert _uids(child) == (NOBODY,) * 3
    if REAL_HOST:
        trees.criu.dump(root, _images(trees, "full"), DumpOptions(), "switcher")
        kill_tree(root)
        restored = trees.restore(trees.folder / "full", "switcher")
        assert http_get(port) == "3"
        assert [_uids(p) for p in process.descendants(restored)] == [(NOBODY,) * 3]
        return

    blocker = users.dump_blocker(root)
    assert blocker is not None and blocker.category == "needs-cap-sys-resource"
    assert f"process {child} (python" in blocker.message and "CAP_SYS_RESOURCE" in blocker.message
    monkeypatch.setattr(users, "dump_blocker", lambda pid: None)
    with pytest.raises(CriuError) as dumped:
        trees.criu.dump(root, _images(trees, "partial"), DumpOptions(), "switcher")
    assert dumped.value.category == "needs-cap-sys-resource" and dumped.value.log is not None
    log = dumped.value.log.read_text()
    # The init (root) is dumped whole; in the switched process the parasite runs and the
    # memory is written; then CRIU's own prlimit() on it fails, and nothing else did.
    assert f"Dumping core (pid: {root})" in log
    assert re.search(rf"Dumping pages \(type: \d+ pid: {child}\)", log)
    assert f"Can't dump sigactions (pid: {child})" not in log
    errors = _errors(log)
    assert errors[0].endswith("Can't get rlimit 0: Operation not permitted"), errors
    assert f"Dump core (pid: {child}) failed" in errors[1]
    assert classify(log)[0] == "needs-cap-sys-resource"
    assert http_get(port) == "3"  # left running


def test_a_program_under_the_init_is_dumped_and_restored_with_its_output(
    trees: Trees,
) -> None:
    """The init itself checkpoints and restores (here with a program that stays root): the
    restored tree's root is the init, PID 1 of a new namespace, and output still reaches
    the log FIFO handed in at restore."""
    port = free_port()
    root = trees.launch([INIT_COMMAND, sys.executable, str(COUNTER), str(port)])
    assert serve(port, 3) == "3"
    images = _images(trees, "images")
    trees.criu.dump(root, images, DumpOptions(), "counter")
    kill_tree(root)
    assert "served request 3" in trees.output()
    restored = trees.restore(images, "counter")
    assert http_get(port) == "4"
    assert str(INIT) in Path(f"/proc/{restored}/cmdline").read_text()
    nspid = Path(f"/proc/{restored}/status").read_text().split("NSpid:")[1].split("\n")[0]
    assert nspid.split()[-1] == "1"
    deadline = time.monotonic() + 10
    while "served request 4" not in (out := trees.output()):
        assert time.monotonic() < deadline, out
        time.sleep(0.05)


def _init(*command: str, stdout: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """The init run directly (not as PID 1), and what it reported on its error pipe."""
    r, w = os.pipe()
    p = subprocess.Popen(
        [sys.executable, "-I", "-S", str(INIT), str(w), *command], pass_fds=(w,), stdout=stdout
    )
    os.close(w)
    with os.fdopen(r, "rb") as failure:
        return p, failure.read().decode()  # EOF once the command was exec'd


def test_the_init_passes_on_signals_and_the_programs_exit_status(workdir: Path) -> None:
    exits, _ = _init("sh", "-c", "exit 3")
    assert exits.wait(10) == 3
    missing, failure = _init("/no/such/program")
    assert missing.wait(10) == 127
    assert failure == "cannot start '/no/such/program': No such file or directory"
    ready = workdir / "ready"
    trap = f"trap 'echo got TERM; exit 5' TERM; touch {ready}; while :; do sleep 0.05; done"
    waiter, _ = _init("sh", "-c", trap, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiter.terminate()  # to the init, which passes it on
    assert waiter.wait(10) == 5
    assert waiter.stdout is not None and waiter.stdout.read() == b"got TERM\n"
    killed, _ = _init("sleep", "100")
    (child,) = process.descendants(killed.pid)
    os.kill(child, 9)
    assert killed.wait(10) == 128 + 9  # PID 1 of a namespace cannot die of its own signal


def test_run_under_the_init_is_refused_where_criu_cannot_read_other_users_limits(
    daemon: Daemon, secret: Path
) -> None:
    port = free_port()
    r = daemon.cli(
        "run",
        "cache",
        "--no-auto-restore",
        "--",
        INIT_COMMAND,
        sys.executable,
        str(SWITCHER),
        str(port),
        str(secret),
        check=False,
    )
    if REAL_HOST:
        assert r.returncode == 0, r.stderr
        assert serve(port, 3) == "3"
        daemon.checkpoint("cache")
        kill_tree(daemon.pid("cache"))
        daemon.cli("restore", "cache")
        assert http_get(port) == "4"
        assert [_uids(p) for p in process.descendants(daemon.pid("cache"))] == [(NOBODY,) * 3]
        daemon.wait_for("cache", lambda st: "served request 4" in daemon.workload_log("cache"))
        return
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "CAP_SYS_RESOURCE" in r.stderr and f"without {INIT_COMMAND}" in r.stderr
    assert daemon.json("status") == []  # nothing registered
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # nothing started


def test_a_checkpoint_of_a_tree_whose_first_process_switched_user_fails_at_once(
    daemon: Daemon, secret: Path
) -> None:
    port = free_port()
    daemon.cli(
        "run",
        "switcher",
        "--no-auto-restore",
        "--",
        sys.executable,
        str(SWITCHER),
        str(port),
        str(secret),
    )
    assert http_get(port) == "1"
    assert _uids(daemon.pid("switcher")) == (NOBODY,) * 3  # the tree's first process
    r = daemon.cli("checkpoint", "switcher", check=False)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert f"{INIT_COMMAND} COMMAND" in r.stderr
    assert "CRIU log" not in r.stderr  # CRIU never ran: the tree was not frozen for nothing
    assert daemon.status("switcher")["state"] == "running"
    assert http_get(port) == "2"


def test_adopting_a_tree_with_a_process_of_another_user(workdir: Path, secret: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SWITCHER), str(port), str(secret)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        cwd=workdir,
    )
    d = Daemon(workdir)
    try:
        assert http_get(port) == "1"
        assert _uids(proc.pid) == (NOBODY,) * 3
        d.start()
        r = d.cli("register", "adopted", "--pid", str(proc.pid), check=False)
        if REAL_HOST:
            assert r.returncode == 0, r.stderr
            d.checkpoint("adopted")
            return
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"process {proc.pid} (python" in r.stderr and "CAP_SYS_RESOURCE" in r.stderr
        assert d.json("status") == []
    finally:
        d.stop()
        proc.kill()
        proc.wait()


def test_memcached_as_debian_runs_it(trees: Trees, monkeypatch: pytest.MonkeyPatch) -> None:
    """memcached -u nobody under the init: CRIU gets through its parasite in the switched
    memcached and stops only where CAP_SYS_RESOURCE is missing; on a real host it restores
    with its cache."""
    memcached = shutil.which("memcached")
    assert memcached, "memcached is not installed: `make setup` installs it"
    port = free_port()
    command = [memcached, "-u", "nobody", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1"]
    root = trees.launch([INIT_COMMAND, *command])
    assert _memcached(port, b"set k 0 0 5\r\nhello\r\n") == b"STORED\r\n"
    (child,) = process.descendants(root)
    assert _uids(child) == (NOBODY,) * 3
    images = _images(trees, "memcached")
    if REAL_HOST:
        trees.criu.dump(root, images, DumpOptions(), "memcached")
        kill_tree(root)
        trees.restore(images, "memcached")
        assert _memcached(port, b"get k\r\n") == b"VALUE k 0 5\r\nhello\r\nEND\r\n"
        return
    monkeypatch.setattr(users, "dump_blocker", lambda pid: None)
    with pytest.raises(CriuError) as dumped:
        trees.criu.dump(root, images, DumpOptions(), "memcached")
    assert dumped.value.category == "needs-cap-sys-resource" and dumped.value.log is not None
    log = dumped.value.log.read_text()
    assert re.search(rf"Dumping pages \(type: \d+ pid: {child}\)", log)
    assert _errors(log)[0].endswith("Can't get rlimit 0: Operation not permitted")
    assert _memcached(port, b"get k\r\n") == b"VALUE k 0 5\r\nhello\r\nEND\r\n"


def _memcached(port: int, request: bytes) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                reply = b""
                while not reply.endswith((b"STORED\r\n", b"END\r\n", b"ERROR\r\n")):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                return reply
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
