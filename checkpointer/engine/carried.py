"""The options a checkpoint carries (schedule, retention, restore policy, env: engine/spec.py),
taken by the host that restores it: a workload registered from another host's checkpoint, or
one that another host ran since it ran here. Used by Recovery (restore by hand) and Migration
(take over) alike.
"""

from __future__ import annotations

import logging

from checkpointer.engine import spec
from checkpointer.engine.parts import Workloads
from checkpointer.engine.workload import Workload
from checkpointer.errors import CheckpointerError
from storage import Repository, StorageError
from storage.manifest import check_workload_name

log = logging.getLogger(__name__)


class FromCheckpoint:
    """Registering a workload from its checkpoint, and taking the options one carries
    (not engine/spec.py's CarriedOptions, which is the parsed `options` themselves)."""

    def __init__(self, workloads: Workloads, repo: Repository) -> None:
        self.workloads = workloads
        self.repo = repo

    def register(self, name: str, checkpoint_id: str | None) -> Workload:
        """A workload checkpointed elsewhere (another host: migration) becomes registered
        here, with the options its checkpoint carries: it runs here as it ran there. Not
        scheduled yet: the caller does that once it may run it."""
        check_workload_name(name)
        infos = self.repo.checkpoints(name)
        if not infos:
            self.workloads.get(name)  # raises: unknown here and nothing stored
        info = self.repo.info(name, checkpoint_id) if checkpoint_id else infos[0]
        s = spec.read(info.metadata, name, info.id)  # RestoreFailed: a malformed tree
        w = Workload(
            name=name, kind=s.kind, command=s.command, cwd=s.cwd, env=s.env, container=s.container
        )
        self.workloads.add(w, s.options)
        _options_problem(
            w,
            s,
            "it runs here with the defaults (no schedule, the top-level retention and restore "
            "policy); declare it in this host's config (workloads:) to give it its options",
        )
        return w

    def take(self, w: Workload, checkpoint_id: str | None = None) -> None:
        """A workload registered here that another host ran since (migrated back, taken over
        again) takes the options its checkpoint (default: the newest) carries: that host's,
        which may differ from what this host registered. A checkpoint that carries none (an
        older version wrote it) or that cannot be read leaves this host's options in place.
        The caller holds the workload's lock; the workload is scheduled by its new options."""
        try:
            if checkpoint_id is None:
                infos = self.repo.checkpoints(w.name)
                if not infos:
                    return
                info = infos[0]
            else:
                info = self.repo.info(w.name, checkpoint_id)
            s = spec.read(info.metadata, w.name, info.id)
        except (CheckpointerError, StorageError) as e:
            log.warning("workload %s keeps the options registered here: %s", w.name, e)
            return
        _options_problem(w, s, "it keeps the options registered here")
        if s.carried:
            w.env = s.env
            self.workloads.update_options(w.name, s.options)


def _options_problem(w: Workload, s: spec.Spec, outcome: str) -> None:
    """Malformed options in a checkpoint, and what this host does instead (`outcome`): said
    in the log, and in `status` (last_error) until the workload's next restore or checkpoint."""
    if s.problem:
        w.last_error = f"{s.problem}: {outcome}"
        log.error("workload %s: %s", w.name, w.last_error)
