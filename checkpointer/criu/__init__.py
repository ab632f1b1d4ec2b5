"""The only code that runs CRIU. Shaped like CRIU's operations: check, dump, restore.

driver runs CRIU; options says what CRIU is told about a workload (and the allow-list of extra
options); failures names what went wrong (CriuError, the log's category and advice); images/ reads
CRIU's images; cpu/ dumps and checks the CPU a checkpoint needs; sandbox/ restores into a
sandbox for drills; kdat_cache and stale_proc_dir deal with this host; lazy/ restores a tree
whose memory follows on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.criu.cpu.info import CpuCheck, CpuMismatch, cpuinfo_check, cpuinfo_dump
    from checkpointer.criu.driver import Criu
    from checkpointer.criu.failures import CriuError
    from checkpointer.criu.images.stats import DumpStats, RestoreStats
    from checkpointer.criu.options import DumpOptions

_WHERE = {
    "CpuCheck": "checkpointer.criu.cpu.info",
    "CpuMismatch": "checkpointer.criu.cpu.info",
    "cpuinfo_check": "checkpointer.criu.cpu.info",
    "cpuinfo_dump": "checkpointer.criu.cpu.info",
    "Criu": "checkpointer.criu.driver",
    "CriuError": "checkpointer.criu.failures",
    "DumpOptions": "checkpointer.criu.options",
    "DumpStats": "checkpointer.criu.images.stats",
    "RestoreStats": "checkpointer.criu.images.stats",
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
