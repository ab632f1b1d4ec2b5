"""The engine: workloads and the operations on them, one at a time per workload.

- facade: the Engine (the workloads, their locks, checkpoint, prune, unregister)
- parts: what the services are given of it (Workloads, Hooks, Schedule)
- services, built by the daemon with only what each uses: recovery (restore, rollback,
  automatic restore), migration (migrate, take over, fence, prefetch), registering (start
  or adopt a tree), reports (status, list, verify, hosts); what Recovery and Migration
  share: cpu_check (can this CPU run it), carried (the options a checkpoint carries)
- policy: the restore policy (decide, plan, back-off, whose fault a failure was); marks:
  the checkpoints restores avoid (bad, crash-looped)
- workload: the typed Workload; states: its kinds, states and the other named values the
  API reports (api.py re-exports them); registry: workloads.json
- checkpointing / restoring / lazy_restoring: the pipelines; checkpoint_spec: the metadata
  a checkpoint carries; spec: the workload in it; maintenance: retention, GC, spool
- scratch: private image folders; kept_image: the newest image kept for a fast restore
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.engine.facade import Engine
    from checkpointer.engine.parts import Hooks
    from checkpointer.engine.scratch import tmpfs_scratch_root
    from checkpointer.engine.states import WorkloadKind, WorkloadState
    from checkpointer.engine.workload import Workload

_WHERE = {
    "Engine": "checkpointer.engine.facade",
    "Hooks": "checkpointer.engine.parts",
    "tmpfs_scratch_root": "checkpointer.engine.scratch",
    "Workload": "checkpointer.engine.workload",
    "WorkloadKind": "checkpointer.engine.states",
    "WorkloadState": "checkpointer.engine.states",
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
