"""What the lazy restore's CRIU tests share: this test process playing the service (a child
subreaper with the service's reaper), a workload launched as PID 1 of its own PID namespace,
a dump and folders to restore it from, page sources with hooks, and the workload's answers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from checkpointer.criu import Criu, DumpOptions
from checkpointer.criu.images.pagemap import PAGE_SIZE
from checkpointer.criu.lazy import FolderPageSource, LazyRestore, prepare_restore_dir
from checkpointer.host import children
from checkpointer.workloads.process import teardown
from checkpointer.workloads.reaper import PR_SET_CHILD_SUBREAPER, Reaper
from tests.support.daemon import Daemon
from tests.support.host import require_root_and_criu
from tests.support.net import http_get
from tests.support.paths import PROGRAMS
from tests.support.processes import kill_tree

LAUNCHER = Path(__file__).parents[2] / "checkpointer" / "workloads" / "launch.py"


@dataclass
class Dump:
    """A dumped workload: the full image folder, and where restores may go."""

    images: Path
    work: Path
    port: int
    criu: Criu
    expected: str
    exits: dict[int, int]  # wait status of every process the reaper collected


@contextlib.contextmanager
def service_reaper() -> Iterator[dict[int, int]]:
    """This test process plays the service: restored trees become its children and are
    reaped by the service's own reaper, which leaves CRIU (children.OWN) alone. Yields the
    wait status of every process it reaped, by PID."""
    require_root_and_criu()
    exits: dict[int, int] = {}
    r = Reaper(exits.__setitem__)
    r.start()
    try:
        yield exits
    finally:
        r.stop()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) == 0
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def launch_in_namespace(argv: Sequence[str]) -> int:
    """`argv` as PID 1 of its own PID namespace (restores never compete for PIDs), as
    `checkpointer run` starts a workload; its host PID."""
    r, w = os.pipe()
    try:
        children.run(
            [sys.executable, str(LAUNCHER), str(w), *argv],
            timeout=30,
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(w)
        w = -1
        status = os.read(r, 200).decode()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert status.startswith("ok "), status
    return int(status.split()[1])


def recv_exact(sk: socket.socket, n: int) -> bytes:
    """Up to `n` bytes: fewer only if the peer closed."""
    buf = b""
    while len(buf) < n:
        chunk = sk.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def ask(port: int, what: bytes, timeout: float = 60.0) -> bytes:
    """The workload's answer; b"" if it closed or reset the connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
                s.sendall(what)
                return recv_exact(s, 65)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        except (ConnectionResetError, TimeoutError):
            return b""


def restore_dir(d: Dump, name: str) -> Path:
    """A folder with every image of the dump but its pages, ready for prepare_restore_dir."""
    out = d.work / name
    out.mkdir(mode=0o700)
    for p in d.images.iterdir():
        if not p.name.startswith("pages-"):
            shutil.copy2(p, out / p.name)
    return out


class CountingSource(FolderPageSource):
    """The dump's pages, with a hook that runs before every read (to fail or stall)."""

    def __init__(self, folder: Path, before: Callable[[int], None] = lambda n: None) -> None:
        super().__init__(folder)
        self.pages = 0
        self.before = before

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        self.before(self.pages)
        self.pages += nr_pages
        return super().read(pages_id, offset, nr_pages)


class FailableSource(CountingSource):
    """The dump's pages at 10 MB/s (a transfer of seconds), until `fail` is set: then every
    read fails as a chunk that does not verify."""

    def __init__(self, folder: Path, fail: threading.Event) -> None:
        super().__init__(folder)
        self.fail = fail

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        if self.fail.is_set():
            raise ValueError("chunk 5f3a... failed verification")
        time.sleep(nr_pages * PAGE_SIZE / 10e6)
        return super().read(pages_id, offset, nr_pages)


class ThrottledSource(CountingSource):
    """The dump's pages at the rate the repository rebuilds an encrypted image here (about
    200 MB/s, bench/results/rebuild.json: materialize_bytes_per_second)."""

    RATE = 200e6

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        time.sleep(nr_pages * PAGE_SIZE / self.RATE)
        return super().read(pages_id, offset, nr_pages)


@contextlib.contextmanager
def lazily_restored(
    d: Dump, name: str, source: CountingSource, stall_timeout: float = 30.0
) -> Iterator[tuple[LazyRestore, float]]:
    """A lazy restore and how long start() took; the tree is killed and reaped at the end."""
    rdir = restore_dir(d, name)
    index = prepare_restore_dir(rdir, source)
    t0 = time.monotonic()
    lr = LazyRestore.start(
        d.criu, rdir, index, source, DumpOptions(), name, stall_timeout=stall_timeout
    )
    try:
        yield lr, time.monotonic() - t0
    finally:
        lr.abort("test over")
        assert lr.wait(30)
        assert lr.pid is not None and teardown(lr.pid, None) == []
        source.close()


def gone(pid: int, timeout: float) -> bool:
    """Whether `pid` is gone (reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


def pausing_criu(folder: Path, when: str, until: Path | None = None) -> tuple[Path, Path]:
    """A criu whose first lazy restore pauses 5 s `when` ("before-resume", "after-resume"),
    or, "before-resume" with `until`, until that file exists (two minutes at most), and the
    file it writes the restored root's PID to when the pause begins."""
    real = shutil.which("criu")
    assert real is not None
    mark = folder / "paused"
    sleeper = folder / "sleeper.sh"
    sleeper.write_text(
        "#!/bin/sh\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] || exit 0\n'
        f"[ -e {mark} ] && exit 0\n"
        f'echo "$CRTOOLS_INIT_PID" > {mark}.tmp && mv {mark}.tmp {mark}\n'
        + (
            f"i=0; while [ ! -e {until} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n"
            if until is not None
            else "sleep 5\n"
        )
    )
    sleeper.chmod(0o700)
    wrapper = folder / "criu"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys, time\n"
        f"real, mark, when, sleeper = {real!r}, {str(mark)!r}, {when!r}, {str(sleeper)!r}\n"
        "args = sys.argv[1:]\n"
        "if args[:1] != ['restore'] or '--lazy-pages' not in args or os.path.exists(mark):\n"
        "    os.execv(real, [real, *args])\n"
        "if when == 'before-resume':\n"
        "    os.execv(real, [real, *args, '--action-script', sleeper])\n"
        "rc = subprocess.call([real, *args], close_fds=False)  # the fds CRIU inherits\n"
        "pid = open(args[args.index('--pidfile') + 1]).read().strip()\n"
        "open(mark + '.tmp', 'w').write(pid)\n"
        "os.rename(mark + '.tmp', mark)\n"
        "time.sleep(5)\n"
        "sys.exit(rc)\n"
    )
    wrapper.chmod(0o700)
    return wrapper, mark


def checksum_server_checkpointed(d: Daemon, port: int, mb: int) -> str:
    """The checksum server run as "sums" (lazy restores, no automatic restore) holding `mb`
    MB, checkpointed, killed, its kept images dropped (a restore reads the repository): its
    right answer."""
    d.cli("run", "sums", "--no-auto-restore", "--lazy-restore", "--", sys.executable,
          str(PROGRAMS / "checksum_server.py"), str(port), str(mb), "7")  # fmt: skip
    right = http_get(port, timeout=60)
    d.checkpoint("sums")
    kill_tree(d.pid("sums"))
    d.drop_kept_images()
    return right
