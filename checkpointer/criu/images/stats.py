"""CRIU's dump and restore statistics, read from the `stats-*` images it writes.

The images are protobuf (`images/stats.proto` in CRIU's source) behind two magic numbers and a
length. The messages hold only varint fields, so a twenty-line decoder does instead of
generated code and a protoc build step.

`as_dict` gives each as the JSON object the API's reports carry (`DumpStatsReport`,
`RestoreStatsReport`, in stats_json.py): the keys are the fields' names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from checkpointer.criu.images.pagemap import read_varint as _varint
from checkpointer.criu.images.stats_json import DumpStatsReport, RestoreStatsReport

_IMG_SERVICE_MAGIC = 0x55105940
_STATS_MAGIC = 0x57093306


@dataclass(frozen=True)
class DumpStats:
    """Seconds and page counts of one dump. frozen includes memdump includes memwrite."""

    freezing_time: float
    frozen_time: float
    memdump_time: float
    memwrite_time: float
    pages_scanned: int
    pages_written: int

    def as_dict(self) -> DumpStatsReport:
        return DumpStatsReport(
            freezing_time=self.freezing_time,
            frozen_time=self.frozen_time,
            memdump_time=self.memdump_time,
            memwrite_time=self.memwrite_time,
            pages_scanned=self.pages_scanned,
            pages_written=self.pages_written,
        )


@dataclass(frozen=True)
class RestoreStats:
    """Seconds and pages of one restore (zero where CRIU wrote no statistics)."""

    forking_time: float
    restore_time: float
    pages_restored: int

    def as_dict(self) -> RestoreStatsReport:
        return RestoreStatsReport(
            forking_time=self.forking_time,
            restore_time=self.restore_time,
            pages_restored=self.pages_restored,
        )


def _fields(buf: bytes) -> dict[int, int | bytes]:
    out: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            out[field], pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            out[field] = buf[pos : pos + n]
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return out


def _read_entry(path: Path) -> dict[int, int | bytes]:
    raw = path.read_bytes()
    magic1, magic2, size = struct.unpack_from("<III", raw)
    if magic1 != _IMG_SERVICE_MAGIC or magic2 != _STATS_MAGIC:
        raise ValueError(f"{path} is not a CRIU stats image")
    return _fields(raw[12 : 12 + size])


def _msg(entry: dict[int, int | bytes], field: int) -> dict[int, int | bytes]:
    sub = entry.get(field)
    if not isinstance(sub, bytes):
        raise ValueError("stats image lacks the expected section")
    return _fields(sub)


def _int(msg: dict[int, int | bytes], field: int) -> int:
    v = msg.get(field, 0)
    return v if isinstance(v, int) else 0


def read_dump_stats(images_dir: Path) -> DumpStats:
    d = _msg(_read_entry(images_dir / "stats-dump"), 1)
    us = 1e-6
    return DumpStats(
        freezing_time=_int(d, 1) * us,
        frozen_time=_int(d, 2) * us,
        memdump_time=_int(d, 3) * us,
        memwrite_time=_int(d, 4) * us,
        pages_scanned=_int(d, 5),
        pages_written=_int(d, 7),
    )


def read_restore_stats(images_dir: Path) -> RestoreStats:
    r = _msg(_read_entry(images_dir / "stats-restore"), 2)
    return RestoreStats(
        forking_time=_int(r, 3) * 1e-6,
        restore_time=_int(r, 4) * 1e-6,
        pages_restored=_int(r, 5),
    )
