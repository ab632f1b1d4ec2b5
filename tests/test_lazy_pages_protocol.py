"""Lazy restore's parts that need neither root nor CRIU: the pagemap codec, the index of lazy
pages, the restore folder, and CRIU's page-server protocol driven by hand."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpointer.criu.images.pagemap import (
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
from checkpointer.criu.lazy import LazyRange, PageIndex, PageSource, prepare_restore_dir
from checkpointer.criu.lazy.page_server import PS_IOV_CLOSE, PS_IOV_GET, PageServer
from tests.support.lazy import recv_exact

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

HEADER = "=I4xQQQ"


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
        head = recv_exact(self.server.peer, 32)
        cmd, n, vaddr, task = _unpack(head)
        return cmd, n, vaddr, task, recv_exact(self.server.peer, n * PAGE_SIZE)


def _pack(cmd: int, nr: int, vaddr: int, task: int) -> bytes:
    return struct.pack(HEADER, cmd, nr, vaddr, task)


def _unpack(b: bytes) -> tuple[int, int, int, int]:
    cmd, n, vaddr, task = struct.unpack(HEADER, b)
    return cmd, n, vaddr, task


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
        assert recv_exact(d.server.peer, 4) == b"\0\0\0\0"
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
        assert recv_exact(d.server.peer, 32) == b""  # no answer: the connection is closed
        d.server.join(5)
        assert len(d.failures) == 1 and why in d.failures[0], d.failures


def test_page_server_reports_the_daemon_hanging_up() -> None:
    with fake_daemon(DictSource()) as d:
        d.server.peer.shutdown(socket.SHUT_WR)
        d.server.join(5)
        assert d.failures and "closed the connection" in d.failures[0]
