"""The only code that runs CRIU. Shaped like CRIU's operations: check, dump, restore."""

from checkpointer.criu.cpuinfo import CpuCheck, CpuMismatch, cpuinfo_check, cpuinfo_dump
from checkpointer.criu.driver import Criu, CriuError, DumpOptions
from checkpointer.criu.stats import DumpStats, RestoreStats

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
