"""CRIU's page-server protocol, the side that answers `criu lazy-pages`: its GET requests for
the pages of a lazily restored tree, read from a `PageSource`.

The connection is one loopback TCP connection we made ourselves and handed to the daemon
(`--ps-socket`): no other local process can ever connect to a server that hands out a
workload's memory; the listener exists only until our own connect is accepted.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from checkpointer.criu.images.pagemap import PAGE_SIZE, PageFlag
from checkpointer.criu.lazy.preparation import PageIndex, PageSource

# criu/page-xfer.c: struct page_server_iov { u32 cmd; u32 pad; u64 nr_pages, vaddr, dst_id; }
_HEADER = struct.Struct("=I4xQQQ")
PS_IOV_ADD_F, PS_IOV_GET = 6, 7
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
_PS_CMD_MASK = 0xFFFF
_ANSWER_CMD = PS_IOV_ADD_F | int(PageFlag.PRESENT) << 16


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

    def connection_fd(self) -> int:
        """Our end of the connection, for the guard to hold a copy of: while one is open,
        `criu lazy-pages` waits for answers instead of exiting (with the tree's userfaultfds)."""
        return self._conn.fileno()

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
            # Shut down, not only closed: the guard holds the connection too (connection_fd),
            # and the daemon must see it end all the same.
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
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
