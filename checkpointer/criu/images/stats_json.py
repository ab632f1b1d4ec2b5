"""CRIU's dump and restore statistics as the API's reports carry them (a checkpoint's
`dump_stats`, a restore's or drill's `restore_stats`): the JSON objects stats.py's DumpStats
and RestoreStats become (`as_dict`, which mypy checks key by key against these).

A module of its own, importing only typing, because api.py re-exports these for the CLI,
whose start should not pay for the image decoders (stats.py, pagemap.py: ~8 ms measured).
The fields repeat the dataclasses' on purpose: one is what the daemon computes with, the
other the wire's contract; tests/test_api_stats.py checks they stay the same keys.
"""

from __future__ import annotations

from typing import TypedDict


class DumpStatsReport(TypedDict):
    """A dump's statistics as JSON (a checkpoint's `dump_stats`): seconds and pages."""

    freezing_time: float
    frozen_time: float
    memdump_time: float
    memwrite_time: float
    pages_scanned: int
    pages_written: int


class RestoreStatsReport(TypedDict):
    """A restore's statistics as JSON (a restore's or drill's `restore_stats`)."""

    forking_time: float
    restore_time: float
    pages_restored: int
