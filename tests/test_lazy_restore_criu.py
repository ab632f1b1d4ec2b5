"""Lazy restore (checkpointer.criu.lazy): the tree runs before its memory has arrived, the
memory that arrives is the checkpoint's, and a page that cannot be delivered kills the tree
instead of letting it run on zeroes.

The CRIU tests dump a program holding 100 MB of distinct bytes generated from a seed, so the
test can recompute their checksum, then restore it lazily with pages read from the dump's
own pages-N.img. The unit tests at the top need neither root nor CRIU.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpointer import children
from checkpointer.criu import Criu, DumpOptions
from checkpointer.criu.lazy import (
    FolderPageSource,
    LazyRange,
    LazyRestore,
    PageIndex,
    PageSource,
    prepare_restore_dir,
)
from checkpointer.criu.lazy.page_server import PS_IOV_CLOSE, PS_IOV_GET, PageServer
from checkpointer.criu.pagemap import (
    PAGE_SIZE,
    PageFlag,
    Pagemap,
    PagemapEntry,
    PagemapError,
    decode_pagemap,
    encode_pagemap,
    read_pagemap,
    write_pagemap,
)
from checkpointer.workloads.process import is_alive, teardown
from checkpointer.workloads.reaper import PR_SET_CHILD_SUBREAPER, Reaper
from tests.support import free_port, require_root_and_criu

HEADER = "=I4xQQQ"
LAUNCHER = Path(__file__).parents[1] / "checkpointer" / "workloads" / "launch.py"
MB = 100
SEED = 20261202

# The workload: MB chunks of 1 MiB from random.Random(seed); on a loopback connection,
# "ping" answers without touching them, "sum" answers the sha256 of all of them, "peek" the
# sha256 of one byte of each of their pages (fast: it answers within milliseconds even when
# every page is missing and the kernel fills them with zeroes), "forksum" the sum computed by
# a child forked for it. With a second port it is a
# tree: a child (forked after a short-lived one, so that its task id and its pages image
# number differ) adds CHILD_MB chunks from seed + 1 and answers for all of its chunks there.
PROGRAM = r"""
import hashlib, os, random, socket, sys
port, mb, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
chunks = [rng.randbytes(1 << 20) for _ in range(mb)]
if len(sys.argv) > 4:
    first = os.fork()
    if first == 0:
        os._exit(0)
    os.waitpid(first, 0)
    if os.fork() == 0:
        port = int(sys.argv[4])
        rng = random.Random(seed + 1)
        chunks += [rng.randbytes(1 << 20) for _ in range(int(sys.argv[5]))]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(8)
while True:
    conn, _ = srv.accept()
    with conn:
        what = conn.recv(16)
        if what.startswith(b"sum"):
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
            conn.sendall(h.hexdigest().encode() + b"\n")
        elif what.startswith(b"forksum"):
            child = os.fork()
            if child == 0:
                h = hashlib.sha256()
                for c in chunks:
                    h.update(c)
                conn.sendall(h.hexdigest().encode() + b"\n")
                os._exit(0)
            os.waitpid(child, 0)
        elif what.startswith(b"peek"):
            h = hashlib.sha256()
            for c in chunks:
                h.update(c[::4096])
            conn.sendall(h.hexdigest().encode() + b"\n")
        else:
            conn.sendall(b"pong\n")
"""
CHILD_MB = 20


def expected_sums(child: bool = False) -> tuple[str, str]:
    """(sum, peek) as the workload (or its child) answers them."""
    full, peek = hashlib.sha256(), hashlib.sha256()
    for seed, n in [(SEED, MB), (SEED + 1, CHILD_MB)][: 2 if child else 1]:
        rng = random.Random(seed)
        for _ in range(n):
            chunk = rng.randbytes(1 << 20)
            full.update(chunk)
            peek.update(chunk[::4096])
    return full.hexdigest(), peek.hexdigest()


# ---------------------------------------------------------------------------------------
# Unit tests: pagemap codec, index, restore folder, protocol (any user, no CRIU)


def _entry(vaddr: int, n: int, flags: PageFlag) -> PagemapEntry:
    return PagemapEntry(vaddr, n, flags, {1: vaddr, 2: n, 4: int(flags)})


def test_pagemap_round_trip_keeps_unknown_fields() -> None:
    e = PagemapEntry(0x7000, 3, PageFlag.PRESENT, {1: 0x7000, 2: 3, 4: 4, 9: 77})
    pm = Pagemap(5, (e, _entry(0x10000, 2, PageFlag.LAZY | PageFlag.PRESENT)))
    back = decode_pagemap(encode_pagemap(pm))
    assert back == pm and back.entries[0].fields[9] == 77
    assert [off for _, off in back.present()] == [0, 3 * PAGE_SIZE]


@pytest.mark.parametrize(
    "entries",
    [
        [_entry(0x2000, 2, PageFlag.PRESENT), _entry(0x3000, 1, PageFlag.PRESENT)],  # overlap
        [_entry(0x1001, 1, PageFlag.PRESENT)],  # unaligned
        [_entry(0x1000, 0, PageFlag.PRESENT)],  # empty
    ],
)
def test_pagemap_refuses_bad_entries(entries: list[PagemapEntry]) -> None:
    with pytest.raises(PagemapError):
        decode_pagemap(encode_pagemap(Pagemap(1, tuple(entries))))


def test_index_locates_by_bisection_and_refuses_strangers() -> None:
    idx = PageIndex({7: [LazyRange(0x10000, 4, 2, 8192), LazyRange(0x1000, 1, 2, 0)]})
    assert idx.locate(7, 0x1000, 5) == (2, 0, 1)  # clipped to the range
    assert idx.locate(7, 0x12000, 10) == (2, 8192 + 2 * PAGE_SIZE, 2)
    for task, vaddr in [(7, 0x2000), (7, 0x14000), (7, 0x0), (8, 0x1000), (7, 0x10001)]:
        with pytest.raises(LookupError):
            idx.locate(task, vaddr, 1)


class DictSource:
    """Page i of pages-N.img is 4096 bytes of (N + i) % 251."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.reads: list[tuple[int, int, int]] = []

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        self.reads.append((pages_id, offset, nr_pages))
        first = offset // PAGE_SIZE
        if self.fail_at is not None and first <= self.fail_at < first + nr_pages:
            raise ValueError("chunk 1234 failed verification")
        return b"".join(bytes([(pages_id + first + i) % 251]) * PAGE_SIZE for i in range(nr_pages))


def test_prepare_keeps_only_non_lazy_pages_and_indexes_the_lazy_ones(tmp_path: Path) -> None:
    lazy = PageFlag.LAZY | PageFlag.PRESENT
    entries = (
        _entry(0x1000, 2, lazy),
        _entry(0x5000, 1, PageFlag.PRESENT),
        _entry(0x9000, 3, lazy),
    )
    write_pagemap(tmp_path / "pagemap-42.img", Pagemap(3, entries))
    write_pagemap(tmp_path / "pagemap-shmem-9.img", Pagemap(4, (_entry(0, 2, lazy),)))
    src = DictSource()
    idx = prepare_restore_dir(tmp_path, src)
    assert (tmp_path / "pages-3.img").read_bytes() == src.read(3, 2 * PAGE_SIZE, 1)
    assert (tmp_path / "pages-4.img").read_bytes() == src.read(4, 0, 2)  # shmem: all local
    flags = [e.flags for e in read_pagemap(tmp_path / "pagemap-42.img").entries]
    assert flags == [PageFlag.LAZY, PageFlag.PRESENT, PageFlag.LAZY]
    assert idx.lazy_pages == 5 and idx.local_pages == 3
    assert idx.locate(42, 0xA000, 9) == (3, 3 * PAGE_SIZE + PAGE_SIZE, 2)  # original offsets
    (tmp_path / "pages-3.img").unlink()
    (tmp_path / "pages-4.img").unlink()
    with pytest.raises(Exception, match="already"):
        prepare_restore_dir(tmp_path, src)  # the original offsets are gone: refused


@dataclass
class FakeDaemon:
    """The daemon's end of the page server's connection, driven by hand."""

    server: PageServer
    failures: list[str]

    def get(self, task: int, vaddr: int, nr: int) -> None:
        self.server.peer.sendall(_pack(PS_IOV_GET, nr, vaddr, task))

    def answer(self) -> tuple[int, int, int, int, bytes]:
        head = _recv(self.server.peer, 32)
        cmd, n, vaddr, task = _unpack(head)
        return cmd, n, vaddr, task, _recv(self.server.peer, n * PAGE_SIZE)


def _pack(cmd: int, nr: int, vaddr: int, task: int) -> bytes:
    import struct

    return struct.pack(HEADER, cmd, nr, vaddr, task)


def _unpack(b: bytes) -> tuple[int, int, int, int]:
    import struct

    cmd, n, vaddr, task = struct.unpack(HEADER, b)
    return cmd, n, vaddr, task


def _recv(sk: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sk.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


@contextlib.contextmanager
def fake_daemon(source: PageSource) -> Iterator[FakeDaemon]:
    failures: list[str] = []
    idx = PageIndex({1: [LazyRange(0x10000, 8, 2, 4 * PAGE_SIZE)]})
    server = PageServer(idx, source, failures.append)
    server.peer.settimeout(10)
    server.start()
    try:
        yield FakeDaemon(server, failures)
    finally:
        server.stop()
        server.peer.close()


def test_page_server_answers_pipelined_gets_in_order_and_closes() -> None:
    src = DictSource()
    with fake_daemon(src) as d:
        d.get(1, 0x10000, 2)
        d.get(1, 0x16000, 64)  # past the range: a shorter answer
        first, second = d.answer(), d.answer()
        assert first[:4] == (6 | 4 << 16, 2, 0x10000, 1)
        assert first[4] == src.read(2, 4 * PAGE_SIZE, 2)
        assert second[1:4] == (2, 0x16000, 1) and second[4] == src.read(2, 10 * PAGE_SIZE, 2)
        d.server.peer.sendall(_pack(PS_IOV_CLOSE, 0, 0, 0))
        assert _recv(d.server.peer, 4) == b"\0\0\0\0"
        d.server.join(5)
        assert d.server.stats().closed and d.server.stats().pages_sent == 4
        assert d.failures == []


@pytest.mark.parametrize(
    "request_, why",
    [
        ((PS_IOV_GET, 1, 0x90000, 1), "no lazy page"),
        ((PS_IOV_GET, 1, 0x10000, 5), "no lazy pages"),  # unknown task
        ((3, 0, 0, 0), "unexpected command"),
        ((PS_IOV_GET, 1, 0x12000, 1), "failed verification"),  # page 6 of pages-2.img
    ],
)
def test_page_server_closes_on_surprises_and_says_why(
    request_: tuple[int, int, int, int], why: str
) -> None:
    with fake_daemon(DictSource(fail_at=6)) as d:
        d.server.peer.sendall(_pack(*request_))
        assert _recv(d.server.peer, 32) == b""  # no answer: the connection is closed
        d.server.join(5)
        assert len(d.failures) == 1 and why in d.failures[0], d.failures


def test_page_server_reports_the_daemon_hanging_up() -> None:
    with fake_daemon(DictSource()) as d:
        d.server.peer.shutdown(socket.SHUT_WR)
        d.server.join(5)
        assert d.failures and "closed the connection" in d.failures[0]


# ---------------------------------------------------------------------------------------
# Real CRIU


@dataclass
class Dump:
    """A dumped workload: the full image folder, and where restores may go."""

    images: Path
    work: Path
    port: int
    criu: Criu
    expected: str
    exits: dict[int, int]  # wait status of every process the reaper collected


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@pytest.fixture(scope="module")
def reaper() -> Iterator[dict[int, int]]:
    """This test process plays the service: restored trees become its children and are
    reaped by the service's own reaper, which leaves CRIU (children.OWN) alone."""
    require_root_and_criu()
    exits: dict[int, int] = {}
    r = Reaper(exits.__setitem__)
    r.start()
    try:
        yield exits
    finally:
        r.stop()
        _set_subreaper(False)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _launch(port: int, child_port: int | None = None) -> int:
    """The workload as PID 1 of its own PID namespace (restores never compete for PIDs)."""
    r, w = os.pipe()
    workload = [str(port), str(MB), str(SEED)]
    if child_port is not None:
        workload += [str(child_port), str(CHILD_MB)]
    try:
        children.run(
            [sys.executable, str(LAUNCHER), str(w), sys.executable, "-c", PROGRAM, *workload],
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


def ask(port: int, what: bytes, timeout: float = 60.0) -> bytes:
    """The workload's answer; b"" if it closed or reset the connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
                s.sendall(what)
                return _recv(s, 65)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        except (ConnectionResetError, TimeoutError):
            return b""


@pytest.fixture(scope="module")
def dump(reaper: dict[int, int]) -> Iterator[Dump]:
    work = Path(tempfile.mkdtemp(prefix="ckpt-lazy-"))
    try:
        os.chmod(work, 0o700)
        criu = Criu("criu", work / "failed-logs", timeout=120)
        port = free_port()
        pid = _launch(port)
        try:
            expected, peek = expected_sums()
            assert ask(port, b"sum").decode().strip() == expected
            assert ask(port, b"peek").decode().strip() == peek
            images = work / "dump"
            images.mkdir(mode=0o700)
            criu.dump(pid, images, DumpOptions(), "lazytest")
        finally:
            assert teardown(pid, None) == []
        yield Dump(images, work, port, criu, expected, reaper)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


def test_lazy_restore_runs_before_its_pages_arrive_and_they_are_the_checkpoints(
    dump: Dump,
) -> None:
    source = CountingSource(dump.images)
    with lazily_restored(dump, "lazy-ok", source) as (lr, started):
        assert lr.pid is not None and is_alive(lr.pid)
        t = time.monotonic()
        assert ask(dump.port, b"ping") == b"pong\n"
        first_answer = time.monotonic() - t + started
        stats = lr.stats()
        assert stats is not None and stats.lazy_pages > MB * 256
        assert stats.pages_sent < stats.lazy_pages, "every page was sent before the first answer"
        print(
            f"\nlazy: start() {started:.3f}s, first answer {first_answer:.3f}s, "
            f"pages sent by then {stats.pages_sent}/{stats.lazy_pages}"
        )
        t = time.monotonic()
        assert ask(dump.port, b"sum").decode().strip() == dump.expected
        print(f"lazy: checksum of 100 MB right {time.monotonic() - t:.3f}s after the first answer")
        assert lr.wait(60) and lr.done() and not lr.failed(), lr.reason
        end = lr.stats()
        assert end is not None and end.closed and end.pages_sent <= end.lazy_pages
        print(f"lazy: done {time.monotonic() - t + first_answer:.3f}s after the start")
        assert ask(dump.port, b"sum").decode().strip() == dump.expected  # the tree owns it all


class ThrottledSource(CountingSource):
    """The dump's pages at the rate the repository rebuilds an encrypted image here (about
    200 MB/s, bench/results/rebuild.json: materialize_bytes_per_second)."""

    RATE = 200e6

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        time.sleep(nr_pages * PAGE_SIZE / self.RATE)
        return super().read(pages_id, offset, nr_pages)


def _materialize(d: Dump, out: Path, source: PageSource) -> None:
    """What a full restore does first: every pages file, fetched from the source."""
    for pm in d.images.glob("pagemap-*.img"):
        pagemap = read_pagemap(pm)
        with open(out / f"pages-{pagemap.pages_id}.img", "wb") as f:
            for entry, offset in pagemap.present():
                f.write(source.read(pagemap.pages_id, offset, entry.nr_pages))


def test_lazy_restore_answers_before_a_full_restore_could_have_fetched_its_pages(
    dump: Dump,
) -> None:
    full_source = ThrottledSource(dump.images)
    rdir = restore_dir(dump, "full")
    t0 = time.monotonic()
    _materialize(dump, rdir, full_source)
    fetched = time.monotonic() - t0
    pid, _ = dump.criu.restore(rdir, DumpOptions(), "full")
    try:
        returned = time.monotonic() - t0
        assert ask(dump.port, b"ping") == b"pong\n"
        full_first = time.monotonic() - t0
        assert ask(dump.port, b"sum").decode().strip() == dump.expected
        full_sum = time.monotonic() - t0
    finally:
        assert teardown(pid, None) == []
        full_source.close()
    print(
        f"\nfull at 200 MB/s: pages fetched {fetched:.3f}s, restored {returned:.3f}s, "
        f"first answer {full_first:.3f}s, checksum {full_sum:.3f}s"
    )

    source = ThrottledSource(dump.images)
    rdir = restore_dir(dump, "lazy-throttled")
    t0 = time.monotonic()
    index = prepare_restore_dir(rdir, source)
    prepared = time.monotonic() - t0
    lr = LazyRestore.start(dump.criu, rdir, index, source, DumpOptions(), "lazy-throttled")
    try:
        returned = time.monotonic() - t0
        assert ask(dump.port, b"ping") == b"pong\n"
        lazy_first = time.monotonic() - t0
        assert ask(dump.port, b"sum").decode().strip() == dump.expected
        lazy_sum = time.monotonic() - t0
        assert lr.wait(60) and lr.done(), lr.reason
        done = time.monotonic() - t0
    finally:
        lr.abort("test over")
        assert lr.wait(30) and lr.pid is not None and teardown(lr.pid, None) == []
        source.close()
    print(
        f"lazy at 200 MB/s: prepared {prepared:.3f}s ({index.local_pages} local pages), "
        f"restored {returned:.3f}s, first answer {lazy_first:.3f}s, checksum {lazy_sum:.3f}s, "
        f"all pages {done:.3f}s"
    )
    assert lazy_first < full_first


def test_a_page_that_cannot_be_fetched_kills_the_tree_before_it_answers(dump: Dump) -> None:
    def fail_after_20mb(sent: int) -> None:
        if sent >= 20 * 256:
            raise ValueError("chunk 5f3a... failed verification")

    with lazily_restored(dump, "lazy-fail", CountingSource(dump.images, fail_after_20mb)) as (
        lr,
        _,
    ):
        assert lr.pid is not None
        answer = ask(dump.port, b"sum", timeout=30)
        assert answer == b"", f"the tree answered {answer!r} after its pages failed"
        assert lr.wait(10) and lr.failed() and not lr.done()
        assert lr.reason is not None and "failed verification" in lr.reason
        assert _gone(lr.pid, 5), "the restored tree is still there"


def test_a_stalled_page_source_trips_the_watchdog(dump: Dump) -> None:
    release = threading.Event()

    def stall_after_10mb(sent: int) -> None:
        if sent >= 10 * 256:
            release.wait(60)

    source = CountingSource(dump.images, stall_after_10mb)
    try:
        with lazily_restored(dump, "lazy-stall", source, stall_timeout=2) as (lr, _):
            assert lr.pid is not None
            t = time.monotonic()
            assert ask(dump.port, b"sum", timeout=30) == b""
            assert lr.wait(10) and lr.failed()
            assert lr.reason is not None and "stall" in lr.reason
            assert time.monotonic() - t < 10
            assert _gone(lr.pid, 5)
    finally:
        release.set()


def test_the_daemon_dying_mid_transfer_kills_the_tree_instead_of_zero_pages(dump: Dump) -> None:
    """Without our copies of its userfaultfds, the kernel would fill the missing pages with
    zeroes once the daemon is gone, and the tree would answer a wrong checksum."""
    release = threading.Event()

    def stall_after_10mb(sent: int) -> None:
        if sent >= 10 * 256:
            release.wait(60)

    source = CountingSource(dump.images, stall_after_10mb)
    try:
        with lazily_restored(dump, "lazy-daemon-dies", source) as (lr, _):
            assert lr.pid is not None and lr.daemon_pid is not None
            answers: list[bytes] = []
            asker = threading.Thread(target=lambda: answers.append(ask(dump.port, b"peek", 30)))
            asker.start()
            time.sleep(0.5)  # the tree now waits for a page the source will not give
            os.kill(lr.daemon_pid, signal.SIGKILL)
            asker.join(40)
            assert answers == [b""], f"the tree answered {answers} without its pages"
            assert lr.wait(10) and lr.failed()
            assert lr.reason is not None and "exited with status -9" in lr.reason
            assert _gone(lr.pid, 5)
            status = dump.exits.get(lr.pid)  # killed by us, not crashed on zeroed memory
            assert status is not None and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        release.set()


def test_a_tree_of_two_processes_gets_the_pages_of_each(reaper: dict[int, int]) -> None:
    """Pages are found by task id in GET and by pages image number in the source: here the
    child is task 3 and its pages are pages-2.img."""
    work = Path(tempfile.mkdtemp(prefix="ckpt-lazy-tree-"))
    try:
        os.chmod(work, 0o700)
        criu = Criu("criu", work / "failed-logs", timeout=120)
        port, child_port = free_port(), free_port()
        pid = _launch(port, child_port)
        try:
            assert ask(child_port, b"ping") == b"pong\n"
            images = work / "dump"
            images.mkdir(mode=0o700)
            criu.dump(pid, images, DumpOptions(), "lazytree")
        finally:
            assert teardown(pid, None) == []
        heads = {p.name: read_pagemap(p).pages_id for p in images.glob("pagemap-*.img")}
        assert heads.get("pagemap-3.img") == 2, heads
        d = Dump(images, work, port, criu, expected_sums()[0], reaper)
        with lazily_restored(d, "lazy-tree", CountingSource(images)) as (lr, _):
            assert ask(child_port, b"sum").decode().strip() == expected_sums(child=True)[0]
            assert ask(port, b"sum").decode().strip() == d.expected
            assert lr.wait(60) and lr.done(), lr.reason
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_child_forked_during_the_transfer_gets_the_checkpoints_pages(dump: Dump) -> None:
    """The daemon follows the fork (UFFD_EVENT_FORK: a new userfaultfd, GETs naming the
    parent's image); our copies of its userfaultfds follow too."""

    class Slow(ThrottledSource):
        RATE = 50e6  # the transfer lasts about 2 s: the fork happens in the middle of it

    source = Slow(dump.images)
    with lazily_restored(dump, "lazy-fork", source) as (lr, _):
        assert ask(dump.port, b"forksum").decode().strip() == dump.expected
        stats = lr.stats()
        assert stats is not None and not stats.closed, "the transfer ended before the fork"
        assert lr.wait(60) and lr.done(), lr.reason
        assert ask(dump.port, b"sum").decode().strip() == dump.expected
