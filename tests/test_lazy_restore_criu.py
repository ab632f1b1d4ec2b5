"""Lazy restore (checkpointer.criu.lazy): the tree runs before its memory has arrived, the
memory that arrives is the checkpoint's, and a page that cannot be delivered kills the tree
instead of letting it run on zeroes.

The CRIU tests dump a program holding 100 MB of distinct bytes generated from a seed, so the
test can recompute their checksum, then restore it lazily with pages read from the dump's
own pages-N.img. The parts that need neither are tested in test_lazy_pages_protocol.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.criu import Criu, DumpOptions
from checkpointer.criu.images.pagemap import read_pagemap
from checkpointer.criu.lazy import LazyRestore, PageSource, prepare_restore_dir
from checkpointer.workloads.process import is_alive, teardown
from tests.support import free_port
from tests.support.lazy import (
    CountingSource,
    Dump,
    ThrottledSource,
    ask,
    gone,
    launch_in_namespace,
    lazily_restored,
    restore_dir,
    service_reaper,
)

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
# Real CRIU


@pytest.fixture(scope="module")
def reaper() -> Iterator[dict[int, int]]:
    with service_reaper() as exits:
        yield exits


def _launch(port: int, child_port: int | None = None) -> int:
    workload = [str(port), str(MB), str(SEED)]
    if child_port is not None:
        workload += [str(child_port), str(CHILD_MB)]
    return launch_in_namespace([sys.executable, "-c", PROGRAM, *workload])


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
        assert gone(lr.pid, 5), "the restored tree is still there"


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
            assert gone(lr.pid, 5)
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
            assert gone(lr.pid, 5)
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
