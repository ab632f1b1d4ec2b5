"""Read and write CRIU's `pagemap-*.img`: which pages of a task's memory the image holds.

Layout (CRIU 4.2, `images/pagemap.proto`): two u32 magic numbers, then records, each a u32
little-endian length and a protobuf message. Record 0 is `pagemap_head {1: pages_id}`, the
rest are `pagemap_entry {1: vaddr, 2: compat_nr_pages, 3: in_parent, 4: flags, 5: nr_pages}`.
`pages-<pages_id>.img` holds the 4 KiB pages of the entries flagged PRESENT, raw, in entry
order, so an entry's place in that file is the sum of the present entries before it.

Every field of these messages is a varint, so a small strict codec does instead of generated
protobuf code; it keeps the fields it does not interpret and writes them back unchanged. The
images come from an authenticated manifest, but a bad one must fail here with a message, not
make CRIU read past a file or the page server serve the wrong bytes: entries are checked to
be page-aligned, non-empty, sorted and non-overlapping.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

PAGE_SIZE = 4096
IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
_MAX_VARINT_BYTES = 10

# pagemap_entry field numbers
_VADDR, _COMPAT_NR_PAGES, _IN_PARENT, _FLAGS, _NR_PAGES = 1, 2, 3, 4, 5


class PageFlag(enum.IntFlag):
    """pagemap_entry.flags (criu/include/pagemap.h)."""

    PARENT = 1
    """The pages are in the parent image (incremental dumps; never made by this service)."""
    LAZY = 2
    """CRIU may restore these pages on demand through userfaultfd."""
    PRESENT = 4
    """The pages are in this image's pages file."""


# The flags as plain ints for the loops over every entry (an IntFlag operand makes each `&`
# an enum operation, ~1 us; a 1 GB Redis has a thousand entries, and a lazy restore waits).
FLAG_PARENT, FLAG_LAZY = int(PageFlag.PARENT), int(PageFlag.LAZY)
FLAG_PRESENT = int(PageFlag.PRESENT)


class PagemapError(ValueError):
    """A pagemap image is not one CRIU wrote, or not one this service can restore from."""


@dataclass(frozen=True)
class PagemapEntry:
    """One run of pages. `fields` are the protobuf fields as read, written back as they were
    except for the flags."""

    vaddr: int
    nr_pages: int
    flags: int  # PageFlag bits
    fields: Mapping[int, int] = field(default_factory=dict, compare=False)

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE


@dataclass(frozen=True)
class Pagemap:
    """A decoded pagemap image: the pages file it refers to and its entries, in order."""

    pages_id: int
    entries: tuple[PagemapEntry, ...]

    def present(self) -> Iterator[tuple[PagemapEntry, int]]:
        """(entry, byte offset in pages-<pages_id>.img) for every PRESENT entry."""
        offset = 0
        for e in self.entries:
            if e.flags & FLAG_PRESENT:
                yield e, offset
                offset += e.nr_pages * PAGE_SIZE

    def pages_file_size(self) -> int:
        return sum(e.nr_pages for e, _ in self.present()) * PAGE_SIZE


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at `pos` and the position after it (CRIU's images are protobuf)."""
    value = shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= len(buf):
            raise PagemapError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise PagemapError("varint longer than 10 bytes")


def _encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if not value:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


_SMALL = [bytes([v]) for v in range(0x80)]


def _decode_message(buf: bytes) -> dict[int, int]:
    out: dict[int, int] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:  # every field number here fits one byte: no call for the key
            pos += 1
        else:
            key, pos = read_varint(buf, pos)
        if key & 7 != 0:
            raise PagemapError(f"field {key >> 3} has wire type {key & 7}; pagemaps hold varints")
        if pos < end and buf[pos] < 0x80:
            out[key >> 3] = buf[pos]
            pos += 1
        else:
            out[key >> 3], pos = read_varint(buf, pos)
    return out


def _encode_message(fields: Mapping[int, int]) -> bytes:
    return b"".join(_encode_varint(no << 3) + _encode_varint(v) for no, v in sorted(fields.items()))


def _entry(fields: dict[int, int]) -> PagemapEntry:
    if _VADDR not in fields:
        raise PagemapError("an entry has no vaddr")
    nr = fields.get(_NR_PAGES, fields.get(_COMPAT_NR_PAGES, 0))
    # CRIU's own default for images older than the flags field (criu/pagemap.c).
    default = FLAG_PARENT if fields.get(_IN_PARENT) else FLAG_PRESENT
    flags = fields.get(_FLAGS, default) & 0x7
    return PagemapEntry(fields[_VADDR], nr, flags, fields)


def _check(entries: list[PagemapEntry], where: str) -> None:
    prev_end = 0
    for e in entries:
        if e.vaddr % PAGE_SIZE or e.nr_pages <= 0 or e.end >= 2**64:
            raise PagemapError(f"{where}: bad entry at {e.vaddr:#x} ({e.nr_pages} pages)")
        if e.vaddr < prev_end:
            raise PagemapError(f"{where}: entries overlap or are unsorted at {e.vaddr:#x}")
        prev_end = e.end


def decode_pagemap(raw: bytes, where: str = "pagemap") -> Pagemap:
    if len(raw) < 8 or struct.unpack_from("<II", raw) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
        raise PagemapError(f"{where}: not a CRIU pagemap image")
    records: list[dict[int, int]] = []
    pos = 8
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise PagemapError(f"{where}: truncated record length")
        (size,) = struct.unpack_from("<I", raw, pos)
        body = raw[pos + 4 : pos + 4 + size]
        if len(body) != size:
            raise PagemapError(f"{where}: truncated record")
        records.append(_decode_message(body))
        pos += 4 + size
    if not records:
        raise PagemapError(f"{where}: no pagemap head")
    entries = [_entry(r) for r in records[1:]]
    _check(entries, where)
    return Pagemap(records[0].get(1, 0), tuple(entries))


def encode_pagemap(pagemap: Pagemap) -> bytes:
    out = [struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)]
    messages = [{1: pagemap.pages_id}] + [
        {**e.fields, _FLAGS: int(e.flags)} for e in pagemap.entries
    ]
    for m in messages:
        body = _encode_message(m)
        out.append(struct.pack("<I", len(body)) + body)
    return b"".join(out)


def read_pagemap(path: Path) -> Pagemap:
    return decode_pagemap(path.read_bytes(), str(path))


def write_pagemap(path: Path, pagemap: Pagemap) -> None:
    """Replace `path` atomically: a half-written pagemap would make CRIU read the wrong pages."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_pagemap(pagemap))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def without_lazy_pages(pagemap: Pagemap) -> Pagemap:
    """The pagemap a lazy restore reads: LAZY entries lose PRESENT (their pages are served
    remotely and are not in the pages file), the rest is unchanged. This is the shape
    `criu dump --lazy-pages` writes (ppb_xfer_flags in criu/page-xfer.c)."""
    keep = ~FLAG_PRESENT
    return replace(
        pagemap,
        entries=tuple(
            PagemapEntry(e.vaddr, e.nr_pages, e.flags & keep, e.fields)
            if e.flags & FLAG_LAZY
            else e
            for e in pagemap.entries
        ),
    )


def task_pagemaps(images_dir: Path) -> dict[int, Path]:
    """{task id in the images: its pagemap-<id>.img}; shmem pagemaps are not a task's."""
    out: dict[int, Path] = {}
    for p in images_dir.glob("pagemap-*.img"):
        stem = p.name[len("pagemap-") : -len(".img")]
        if stem.isdigit():
            out[int(stem)] = p
    return out
