"""The only code that runs CRIU. Shaped like CRIU's operations: check, dump, restore."""

from checkpointer.criu.driver import Criu, CriuError, DumpOptions
from checkpointer.criu.stats import DumpStats, RestoreStats

__all__ = ["Criu", "CriuError", "DumpOptions", "DumpStats", "RestoreStats"]
