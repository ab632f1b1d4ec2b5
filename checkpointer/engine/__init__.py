"""The engine: workloads and the operations on them, one at a time per workload.

- facade: the Engine (per-workload locks, the operations, the automatic-restore hook)
- workload: the typed Workload, its kinds and states; registry: workloads.json
- checkpointing / restoring: the two pipelines; maintenance: retention, GC, spool
- registering: start or adopt a tree; reports: status, list, verify
- scratch: private image folders; kept_image: the newest image kept for a fast restore
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.engine.facade import Engine, Hooks
    from checkpointer.engine.scratch import tmpfs_scratch_root
    from checkpointer.engine.workload import Workload, WorkloadKind, WorkloadState

_WHERE = {
    "Engine": "checkpointer.engine.facade",
    "Hooks": "checkpointer.engine.facade",
    "tmpfs_scratch_root": "checkpointer.engine.scratch",
    "Workload": "checkpointer.engine.workload",
    "WorkloadKind": "checkpointer.engine.workload",
    "WorkloadState": "checkpointer.engine.workload",
}

__getattr__ = lazy_exports(__name__, _WHERE)  # names load on first use


__all__ = [
    "Engine",
    "Hooks",
    "Workload",
    "WorkloadKind",
    "WorkloadState",
    "tmpfs_scratch_root",
]
