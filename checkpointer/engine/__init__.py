"""The engine: workloads and the operations on them, one at a time per workload."""

from checkpointer.engine.facade import Engine, Workload, tmpfs_scratch_root

__all__ = ["Engine", "Workload", "tmpfs_scratch_root"]
