"""Lazy restore: the tree runs as soon as CRIU has rebuilt it; its memory follows on demand.

`criu restore --lazy-pages` leaves the pages CRIU marked LAZY (private anonymous memory, but
not the page under a thread's stack pointer: vma_entry_can_be_lazy and generate_iovs in
criu/mem.c) unmapped and registered with userfaultfd. A `criu lazy-pages` daemon receives the
userfaultfds, and fetches each missing page, on fault or in the background, from a page
server. Here the page server is ours: it answers CRIU's GET requests from a `PageSource`
(the repository, fetching and verifying the chunks of `pages-N.img`), so a restore no longer
waits for every page to be downloaded. Measured on a 200 MB workload: the tree ran 0.12 s
after the start, against 0.3 to 0.9 s for a full restore from local disk, before any fetch.

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
- The connection: the daemon gets one end of a loopback TCP connection we made ourselves
  (`--ps-socket`), so no other local process can ever connect to a server that hands out a
  workload's memory; the listener exists only until our own connect is accepted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import checkpointer
from checkpointer import children
from checkpointer.criu.driver import Criu, CriuError, DumpOptions, classify
from checkpointer.criu.pagemap import (
    FLAG_LAZY,
    FLAG_PARENT,
    FLAG_PRESENT,
    PAGE_SIZE,
    PageFlag,
    PagemapEntry,
    PagemapError,
    read_pagemap,
    task_pagemaps,
    without_lazy_pages,
    write_pagemap,
)
from checkpointer.criu.stats import RestoreStats, read_restore_stats
from checkpointer.uffd_hold import UffdHold
from checkpointer.workloads.process import descendants, is_alive, start_time

log = logging.getLogger(__name__)

# criu/page-xfer.c: struct page_server_iov { u32 cmd; u32 pad; u64 nr_pages, vaddr, dst_id; }
_HEADER = struct.Struct("=I4xQQQ")
PS_IOV_ADD_F, PS_IOV_GET = 6, 7
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
_PS_CMD_MASK = 0xFFFF
_ANSWER_CMD = PS_IOV_ADD_F | int(PageFlag.PRESENT) << 16
_COPY_SLICE_PAGES = 256  # 1 MiB per PageSource read when copying the non-lazy pages
_TICK = 0.05
# The guard's entry point, and the folder that holds the checkpointer package (a checkout or
# site-packages): given as an argument, never spliced into the code.
_GUARD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from checkpointer.lazy_guard import main; sys.exit(main())"
)
_PACKAGE_ROOT = str(Path(checkpointer.__file__).resolve().parent.parent)


class PageSource(Protocol):
    """Where the pages of a checkpoint come from."""

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        """Exactly `nr_pages` pages from `pages-<pages_id>.img` as CRIU dumped it, starting at
        byte `offset` (a multiple of 4096). Called from one thread at a time, possibly not the
        caller's. Raises if a page cannot be fetched or verified; never returns wrong bytes.

        Keyed by the pages image, not by task: CRIU numbers pages images with a counter
        (pagemap-<task>.img names its pages-<N>.img in its head), and shared memory has pages
        images that belong to no task."""
        ...


class _NoPagesYet:
    """The page source of a restore between `LazyRestore.begin` and `run`: no request can
    come then (no tree, no userfaultfd), and one that did would fail the restore."""

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        raise LookupError("a page was asked for before the restore began")


class FolderPageSource:
    """Pages read from a folder of CRIU images: a kept local image, or tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[int, int] = {}
        self._lock = threading.Lock()

    def read(self, pages_id: int, offset: int, nr_pages: int) -> bytes:
        with self._lock:
            fd = self._files.get(pages_id)
            if fd is None:
                fd = os.open(self.folder / f"pages-{pages_id}.img", os.O_RDONLY | os.O_CLOEXEC)
                self._files[pages_id] = fd
        data = os.pread(fd, nr_pages * PAGE_SIZE, offset)
        if len(data) != nr_pages * PAGE_SIZE:
            raise OSError(
                f"pages-{pages_id}.img is shorter than offset {offset} + {nr_pages} pages"
            )
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()


@dataclass(frozen=True)
class LazyRange:
    """A run of lazy pages: where the task had them, and where they are in the pages file."""

    vaddr: int
    nr_pages: int
    pages_id: int
    offset: int


class PageIndex:
    """Answers "where are the pages of task T at address A" for the page server, by bisection
    over each task's sorted ranges (a task has thousands of entries after a long run)."""

    def __init__(self, ranges: Mapping[int, Sequence[LazyRange]], local_pages: int = 0) -> None:
        self._ranges = {task: sorted(rs, key=lambda r: r.vaddr) for task, rs in ranges.items()}
        self._starts = {task: [r.vaddr for r in rs] for task, rs in self._ranges.items()}
        self.lazy_pages = sum(r.nr_pages for rs in self._ranges.values() for r in rs)
        self.local_pages = local_pages

    def locate(self, task: int, vaddr: int, nr_pages: int) -> tuple[int, int, int]:
        """(pages_id, byte offset, pages) for a GET: at most `nr_pages`, never past the range
        (a shorter answer is allowed by the protocol). Raises LookupError if no lazy range of
        `task` holds `vaddr`: CRIU never asks for such a page, so it means wrong images."""
        starts = self._starts.get(task)
        if starts is None:
            raise LookupError(f"task {task} has no lazy pages in these images")
        i = bisect_right(starts, vaddr) - 1
        if i < 0 or nr_pages <= 0 or vaddr % PAGE_SIZE:
            raise LookupError(f"task {task}: no lazy page at {vaddr:#x}")
        r = self._ranges[task][i]
        skip = (vaddr - r.vaddr) // PAGE_SIZE
        if skip >= r.nr_pages:
            raise LookupError(f"task {task}: no lazy page at {vaddr:#x}")
        return r.pages_id, r.offset + skip * PAGE_SIZE, min(nr_pages, r.nr_pages - skip)


def prepare_restore_dir(images_dir: Path, source: PageSource) -> PageIndex:
    """Turn a folder holding every image of a checkpoint except its `pages-*.img` into one
    `criu restore --lazy-pages` accepts, and return the index the page server needs.

    Which pages are lazy is CRIU's own decision at dump time (the LAZY flag it writes on every
    entry it could restore on demand); we only drop PRESENT from those entries and write each
    pages file with the other pages, read from `source`. The folder must not be prepared
    twice (a LAZY entry without PRESENT is refused): the original offsets would be lost."""
    if any(images_dir.glob("pages-*.img")):
        raise CriuError(
            f"{images_dir} already holds pages-*.img; a lazy restore folder gets its pages "
            "from the page source",
            "bad-images",
        )
    ranges: dict[int, list[LazyRange]] = {}
    local = 0
    seen_ids: set[int] = set()
    tasks = {p: t for t, p in task_pagemaps(images_dir).items()}
    for path in sorted(images_dir.glob("pagemap-*.img")):
        try:
            pagemap = read_pagemap(path)
        except PagemapError as e:
            raise CriuError(f"cannot prepare a lazy restore: {e}", "bad-images") from e
        _refuse_unusable(path, pagemap.entries, pagemap.pages_id, seen_ids)
        task = tasks.get(path)
        with open(images_dir / f"pages-{pagemap.pages_id}.img", "xb") as out:
            for entry, offset in pagemap.present():
                if task is not None and entry.flags & FLAG_LAZY:
                    rng = LazyRange(entry.vaddr, entry.nr_pages, pagemap.pages_id, offset)
                    ranges.setdefault(task, []).append(rng)
                else:
                    _copy_pages(source, pagemap.pages_id, offset, entry.nr_pages, out)
                    local += entry.nr_pages
            out.flush()
            os.fsync(out.fileno())
        if task is not None:
            write_pagemap(path, without_lazy_pages(pagemap))
    return PageIndex(ranges, local)


def _refuse_unusable(
    path: Path, entries: Sequence[PagemapEntry], pages_id: int, seen: set[int]
) -> None:
    for e in entries:
        flags = e.flags
        if flags & FLAG_PARENT:
            raise CriuError(f"{path.name}: pages in a parent image; not restorable", "bad-images")
        if flags & FLAG_LAZY and not flags & FLAG_PRESENT:
            raise CriuError(
                f"{path.name} has lazy pages that are not in the image: the folder was already "
                "prepared, or dumped with --lazy-pages; prepare it from the checkpoint again",
                "bad-images",
            )
    if pages_id in seen:
        raise CriuError(f"{path.name}: pages-{pages_id}.img used twice", "bad-images")
    seen.add(pages_id)


def _copy_pages(source: PageSource, pages_id: int, offset: int, nr: int, out: BinaryIO) -> None:
    done = 0
    while done < nr:
        n = min(_COPY_SLICE_PAGES, nr - done)
        data = source.read(pages_id, offset + done * PAGE_SIZE, n)
        if len(data) != n * PAGE_SIZE:
            raise CriuError(f"page source returned {len(data)} bytes for {n} pages", "bad-images")
        out.write(data)
        done += n


@dataclass(frozen=True)
class TransferStats:
    """What the page server has done so far. Times are time.monotonic()."""

    requests: int
    pages_sent: int
    lazy_pages: int
    first_request_at: float | None
    closed: bool  # the daemon said CLOSE: every page it wanted was delivered


class PageServer:
    """CRIU's page-server protocol, the GET side, on one loopback TCP connection, one thread.

    Requests are answered in order (the daemon matches answers to its FIFO of requests). On
    anything unexpected (an unknown command, a page no lazy range holds, a PageSource error)
    it calls `on_failure` with the reason, then closes the connection: the protocol has no
    error answer."""

    def __init__(
        self,
        index: PageIndex,
        source: PageSource,
        on_failure: Callable[[str], None],
        on_first_request: Callable[[], None] = lambda: None,
    ) -> None:
        self.index = index
        self.source = source
        self.on_failure = on_failure
        self.on_first_request = on_first_request
        self._conn, self.peer = _loopback_pair()
        self._lock = threading.Lock()
        self._requests = self._pages = 0
        self._first: float | None = None
        self._closed = False
        self._stopping = False
        self._busy_since: float | None = None
        self.last_activity = time.monotonic()
        self._thread = threading.Thread(target=self._serve, name="lazy-page-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> TransferStats:
        with self._lock:
            return TransferStats(
                self._requests, self._pages, self.index.lazy_pages, self._first, self._closed
            )

    def stalled_for(self, now: float) -> float:
        """Seconds the oldest unanswered request has waited, or since anything happened;
        0 once the daemon said CLOSE (its exit is then all that is left)."""
        with self._lock:
            if self._closed:
                return 0.0
            return now - (self._busy_since if self._busy_since is not None else self.last_activity)

    def touch(self) -> None:
        """Count idle time from now (the tree has just started running)."""
        with self._lock:
            self.last_activity = time.monotonic()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the connection (the daemon sees it closed) and wait for the thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is None:  # never started: nobody else closes the sockets
            self._conn.close()
            self.peer.close()
        elif self._thread.is_alive() and self._thread is not threading.current_thread():
            # A PageSource stuck in read() keeps the thread; it ends when read() returns.
            self._thread.join(timeout)

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a PageSource error, or the connection broke
            if not self._stopping:
                self.on_failure(f"page server: {type(e).__name__}: {e}")
        finally:
            self._conn.close()

    def _loop(self) -> None:
        while True:
            header = _recv_exact(self._conn, _HEADER.size)
            if header is None:
                if not self._stopping:
                    self.on_failure("criu lazy-pages closed the connection before it said CLOSE")
                return
            cmd, nr_pages, vaddr, task = _HEADER.unpack(header)
            with self._lock:
                self._busy_since = self.last_activity = time.monotonic()
            command = cmd & _PS_CMD_MASK
            if command in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                self._conn.sendall(struct.pack("=i", 0))
                with self._lock:
                    self._closed = True
                return
            if command != PS_IOV_GET:
                self.on_failure(f"page server: unexpected command {cmd:#x} from criu lazy-pages")
                return
            self._answer(task, vaddr, nr_pages)

    def _answer(self, task: int, vaddr: int, nr_pages: int) -> None:
        if self._first is None:
            self._first = time.monotonic()
            self.on_first_request()
        pages_id, offset, n = self.index.locate(task, vaddr, nr_pages)
        data = self.source.read(pages_id, offset, n)
        if len(data) != n * PAGE_SIZE:
            raise ValueError(f"page source returned {len(data)} bytes for {n} pages")
        self._conn.sendall(_HEADER.pack(_ANSWER_CMD, n, vaddr, task) + data)
        with self._lock:
            self._requests += 1
            self._pages += n
            self._busy_since = None
            self.last_activity = time.monotonic()


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    """(our end, the daemon's end) of a TCP connection on 127.0.0.1, port chosen by the kernel.

    Accepted connections other than our own connect (another local process racing for the
    port) are closed unanswered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(10)
        peer = socket.create_connection(listener.getsockname(), timeout=10)
        peer.settimeout(None)
        while True:
            conn, addr = listener.accept()
            if addr == peer.getsockname():
                break
            conn.close()
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, peer


def _recv_exact(sk: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sk.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ConnectionError(f"criu lazy-pages sent a truncated header ({len(buf)} B)")
            return None
        buf += chunk
    return bytes(buf)


def _spawn(cmd: list[str], pass_fds: tuple[int, ...], stderr: int) -> subprocess.Popen[bytes]:
    """Popen for a child the daemon's reaper must leave alone (see checkpointer.children)."""
    with children.LOCK:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=pass_fds,
            start_new_session=True,  # a terminal's Ctrl-C must not end it before the tree
        )
        children.OWN.add(proc.pid)
    return proc


def _reap(proc: subprocess.Popen[bytes], kill: bool, timeout: float = 10.0) -> int | None:
    if kill and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    with children.LOCK:
        children.OWN.discard(proc.pid)
    return rc


def _pidfd_alive(pidfd: int) -> bool:
    """Whether the process has not exited yet (a pidfd polls readable once it has)."""
    ready, _, _ = select.select([pidfd], [], [], 0)
    return not ready


def _check_private_dir(d: Path) -> None:
    """The folder holds lazy-pages.socket, which hands out the tree's memory: root's only."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CriuError(
            f"{d} must be a directory of uid {os.geteuid()} with mode 0700 for a lazy restore",
            "permission",
        )


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
        self._ready_r = -1  # the daemon's readiness pipe, between _spawn_daemon and _await_daemon
        self._spawned_at = 0.0
        self._ready_timeout = 30.0
        self.on_finish: Callable[[LazyRestore], None] | None = None
        self.kept_log: Path | None = None  # the daemon's CRIU log, kept when it failed
        self._reason: str | None = None
        self._done = False
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._root: int | None = None  # pidfd of the restored root: never a reused PID
        self._killed: dict[int, int | None] = {}  # pid -> start time, for the same reason
        base = images_dir.parent / images_dir.name
        self._daemon_log = Path(f"{base}.lazy-pages.log")
        self._daemon_err = Path(f"{base}.lazy-pages.stderr")
        self._restore_log = Path(f"{base}.restore.log")
        self._server: PageServer | None = None
        self._daemon: subprocess.Popen[bytes] | None = None
        self._hold: UffdHold | None = None
        self._guard: subprocess.Popen[bytes] | None = None  # see checkpointer.lazy_guard
        self._guard_w = -1

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
        _check_private_dir(images_dir)
        self = cls(criu, images_dir, label, stall_timeout)
        self._server = PageServer(PageIndex({}), _NoPagesYet(), self._fail, self._grab_uffds)
        self._ready_timeout = ready_timeout
        try:
            self._spawn_daemon()
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

    def _spawn_daemon(self) -> None:
        assert self._server is not None
        t0 = time.monotonic()
        (self.images_dir / "lazy-pages.socket").unlink(missing_ok=True)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        peer = self._server.peer
        cmd = [
            *(self.criu.exe(), "lazy-pages", "--images-dir", str(self.images_dir)),
            *("--page-server", "--ps-socket", str(peer.fileno())),
            *("--status-fd", str(ready_w), "--log-file", str(self._daemon_log), "-v4"),
        ]
        try:
            with open(self._daemon_err, "wb") as err:
                self._daemon = _spawn(cmd, (peer.fileno(), ready_w), err.fileno())
        finally:
            os.close(ready_w)
            peer.close()  # the daemon's end is the daemon's: its death must reach us as EOF
        self._ready_r, self._spawned_at = ready_r, t0

    def _await_daemon(self, ready_timeout: float) -> None:
        """Wait until the daemon spawned by `_spawn_daemon` listens."""
        assert self._daemon is not None
        ready_r, self._ready_r = self._ready_r, -1
        try:
            ready, _, _ = select.select([ready_r], [], [], ready_timeout)
            got = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
        if got != b"\0":
            raise self._daemon_error("did not start" if ready else "did not start in time")
        self._ready_in = time.monotonic() - self._spawned_at
        self._hold = UffdHold(self._daemon.pid)  # now: the daemon is our child, not reaped
        self._start_guard(self._daemon.pid)

    def _start_guard(self, daemon_pid: int) -> None:
        """The guard holds the userfaultfds too, and kills the tree if this process dies
        before the pages are all there (checkpointer.lazy_guard). Without site (-S) and with
        nothing but the standard library to import, it starts in ~30 ms of CPU, not the ~110
        of `-m` through the package: it starts while CRIU restores, on the same two cores.
        Isolated (-I: neither the working folder nor PYTHON* variables on its path), as it
        runs as root: only the standard library and our own package are imported."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with children.LOCK:
                self._guard = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _GUARD, _PACKAGE_ROOT, str(daemon_pid)],
                    cwd="/",
                    stdin=r,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,  # it must outlive us, whatever kills us
                )
                children.OWN.add(self._guard.pid)
        finally:
            os.close(r)
        self._guard_w = w

    def _tell_guard(self, what: str) -> None:
        if self._guard_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._guard_w, what.encode() + b"\n")

    def _end_guard(self) -> None:
        """The tree owns its memory, or is dead: the guard may let go."""
        if self._guard_w >= 0:
            self._tell_guard("done")
            os.close(self._guard_w)
            self._guard_w = -1
        if self._guard is not None:
            if _reap(self._guard, kill=False, timeout=5.0) is None:
                log.warning("the guard of the lazy restore of %s did not exit", self.label)
            self._guard = None

    def _restore(self, opts: DumpOptions, inherit: Sequence[tuple[int, str]]) -> None:
        pidfile = Path(f"{self.images_dir.parent / self.images_dir.name}.pid")
        pidfile.unlink(missing_ok=True)
        cmd = [
            *(self.criu.exe(), "restore", "--images-dir", str(self.images_dir)),
            *("--lazy-pages", "--restore-detached", "--pidfile", str(pidfile)),
            *("--log-file", str(self._restore_log), "-v4"),
            *opts.common_args(),
            *opts.extra_args("restore"),
        ]
        for fd, resource in inherit:
            cmd += ["--inherit-fd", f"fd[{fd}]:{resource}"]
        if opts.tcp_close:
            cmd.append("--tcp-close")
        self.criu.run_logged(
            cmd, self._restore_log, self.label, "restore", tuple(fd for fd, _ in inherit)
        )
        try:
            pid = int(pidfile.read_text().strip())
        finally:
            pidfile.unlink(missing_ok=True)
        with contextlib.suppress(ProcessLookupError):  # gone already: nothing left to kill
            self._root = os.pidfd_open(pid)
        self.pid = pid
        self._tell_guard(f"root {pid} {start_time(pid) or '-'}")
        self.restore_stats = read_restore_stats(self.images_dir)
        with self._lock:
            if self._reason is not None:  # failed while CRIU ran: the tree must not run
                self._kill_tree()
        self._grab_uffds()
        assert self._server is not None
        self._server.touch()  # the stall watchdog counts from here

    def _daemon_error(self, what: str) -> CriuError:
        rc = _reap(self._daemon, kill=True) if self._daemon else None
        text = self._read(self._daemon_log) + "\n" + self._read(self._daemon_err)
        category, first, advice = classify(text)
        kept = self.criu.keep_log(self._daemon_log, self.label, "lazy-pages")
        return CriuError(
            f"criu lazy-pages for {self.label} {what} (status {rc}): {first}; {advice}",
            category,
            kept,
        )

    def _teardown_start(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
        if self._server:
            self._server.stop()
        if self._daemon:
            _reap(self._daemon, kill=True)
            if self._daemon_log.exists():
                self.criu.keep_log(self._daemon_log, self.label, "lazy-pages")
        if self.pid is not None:
            self._wait_tree_dead(10.0)
        if self._hold:
            self._hold.release()
        self._end_guard()
        self._close_root()
        self._daemon_err.unlink(missing_ok=True)
        self._finished.set()

    # Failure -----------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Record the first failure and SIGKILL the tree at once; the monitor finishes."""
        with self._lock:
            if self._reason is not None or self._done:
                return
            self._reason = reason
            log.warning("lazy restore of %s failed: %s", self.label, reason)
            self._kill_tree()

    def _kill_tree(self) -> None:
        """SIGKILL the root (by pidfd) and every descendant seen so far (by PID and start
        time); again on every call, for processes forked meanwhile. Call with the lock."""
        if self.pid is None:
            return
        if self._root is not None and _pidfd_alive(self._root):  # so self.pid is still it
            for p in descendants(self.pid):
                self._killed.setdefault(p, start_time(p))
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._root, signal.SIGKILL)
        for p, started in self._killed.items():
            if is_alive(p, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def _tree_dead(self) -> bool:
        with self._lock:
            root_alive = self._root is not None and _pidfd_alive(self._root)
            return not root_alive and not any(is_alive(p, t) for p, t in self._killed.items())

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
            if self._root is not None:
                os.close(self._root)
                self._root = None

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
                self._fail(self._daemon_failure(rc))
            elif self._server.stalled_for(time.monotonic()) > self.stall_timeout:
                self._fail(f"no page transferred for {self.stall_timeout:.0f}s (stall watchdog)")
            else:
                self._grab_uffds()
                return False
        return self._finish_failed()

    def _daemon_failure(self, rc: int) -> str:
        _, first, _ = classify(self._read(self._daemon_log))
        return f"criu lazy-pages exited with status {rc}: {first}"

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
        _reap(self._daemon, kill=False)
        for p in (self._daemon_log, self._daemon_err, self._restore_log):
            p.unlink(missing_ok=True)
        self._finished.set()
        return True

    def _finish_failed(self) -> bool:
        """Kill the tree until it is dead; only then close the connection and the copies."""
        assert self._daemon is not None and self._server is not None and self._hold
        if not self._wait_tree_dead(5.0):
            log.error("lazy restore of %s: the tree does not die; holding its pages", self.label)
            return False
        self._hold.release()
        self._end_guard()
        self._close_root()
        self._server.stop(timeout=1.0)
        _reap(self._daemon, kill=True)
        if self._daemon_log.exists():
            self.kept_log = self.criu.keep_log(self._daemon_log, self.label, "lazy-pages")
        self._daemon_err.unlink(missing_ok=True)
        self._restore_log.unlink(missing_ok=True)
        self._finished.set()
        return True

    @staticmethod
    def _read(p: Path) -> str:
        try:
            return p.read_text(errors="replace")
        except OSError:
            return ""
