"""The engine: workloads and the operations on them, one at a time per workload.

- facade: the Engine (per-workload locks, the operations, the automatic-restore hook)
- workload: the typed Workload, its kinds and states; registry: workloads.json
- checkpointing / restoring: the two pipelines; maintenance: retention, GC, spool
- registering: start or adopt a tree; reports: status, list, verify
- scratch: private image folders; kept_image: the newest image kept for a fast restore
"""

from checkpointer.engine.facade import Engine, Hooks
from checkpointer.engine.scratch import tmpfs_scratch_root
from checkpointer.engine.workload import Workload, WorkloadKind, WorkloadState

__all__ = ["Engine", "Hooks", "Workload", "WorkloadKind", "WorkloadState", "tmpfs_scratch_root"]
