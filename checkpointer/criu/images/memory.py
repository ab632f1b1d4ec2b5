"""Read CRIU's memory images: which pages, at which virtual addresses, with what bytes.

Used to measure what really changed between two checkpoints (the floor for dedup) in tests and
benchmarks. `pagemap-N.img` lists (vaddr, nr_pages, flags) entries; `pages-M.img` holds the
present pages, raw, in that order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from checkpointer.criu.images.stats import _fields

PAGE = 4096
_PE_PARENT = 1
_PE_PRESENT = 4


def _entries(path: Path) -> Iterator[dict[int, int | bytes]]:
    raw = path.read_bytes()
    pos = 8  # two magic numbers
    while pos + 4 <= len(raw):
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        yield _fields(raw[pos : pos + size])
        pos += size


def _int(e: dict[int, int | bytes], field: int, default: int) -> int:
    v = e.get(field, default)
    return v if isinstance(v, int) else default


def pages_by_address(images: Path) -> dict[tuple[str, int], bytes]:
    """{(pagemap file name, vaddr): page bytes} for every page stored in the image folder."""
    out: dict[tuple[str, int], bytes] = {}
    for pagemap in sorted(images.glob("pagemap-*.img")):
        entries = _entries(pagemap)
        head = next(entries)
        pages_id = _int(head, 1, 0)
        with open(images / f"pages-{pages_id}.img", "rb") as pages:
            for e in entries:
                vaddr, n = _int(e, 1, 0), _int(e, 5, _int(e, 2, 0))  # nr_pages, else compat
                flags = _int(e, 4, _PE_PRESENT)
                if e.get(3):
                    flags |= _PE_PARENT
                if not flags & _PE_PRESENT or flags & _PE_PARENT:  # LAZY pages are stored too
                    continue
                for i in range(n):
                    out[(pagemap.name, vaddr + i * PAGE)] = pages.read(PAGE)
    return out


def changed_page_bytes(before: Path, after: Path) -> int:
    """Bytes of the pages of `after` that are not in `before` at the same address, same bytes."""
    old = pages_by_address(before)
    return sum(PAGE for key, page in pages_by_address(after).items() if old.get(key) != page)
