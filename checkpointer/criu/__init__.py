"""The only code that runs CRIU. Shaped like CRIU's operations: check, dump, restore.

driver runs CRIU; options says what CRIU is told about a workload (and the allow-list of extra
options); failures names what went wrong (CriuError, the log's category and advice); stats,
pagemap and images read CRIU's images; cpuinfo, kdat_cache and stale_proc_dir deal with this
host; lazy/ restores a tree whose memory follows on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.criu.cpuinfo import CpuCheck, CpuMismatch, cpuinfo_check, cpuinfo_dump
    from checkpointer.criu.driver import Criu
    from checkpointer.criu.failures import CriuError
    from checkpointer.criu.options import DumpOptions
    from checkpointer.criu.stats import DumpStats, RestoreStats

_WHERE = {
    "CpuCheck": "checkpointer.criu.cpuinfo",
    "CpuMismatch": "checkpointer.criu.cpuinfo",
    "cpuinfo_check": "checkpointer.criu.cpuinfo",
    "cpuinfo_dump": "checkpointer.criu.cpuinfo",
    "Criu": "checkpointer.criu.driver",
    "CriuError": "checkpointer.criu.failures",
    "DumpOptions": "checkpointer.criu.options",
    "DumpStats": "checkpointer.criu.stats",
    "RestoreStats": "checkpointer.criu.stats",
}

__getattr__ = lazy_exports(__name__, _WHERE)  # names load on first use


__all__ = [
    "CpuCheck",
    "CpuMismatch",
    "Criu",
    "CriuError",
    "DumpOptions",
    "DumpStats",
    "RestoreStats",
    "cpuinfo_check",
    "cpuinfo_dump",
]
