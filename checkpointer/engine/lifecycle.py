"""A workload's process: starting a managed tree, stopping one, recording that one died.

The engine calls these with the workload's lock held (a death is recorded without it: the
reaper learns of it at any moment, and only the state changes; what a failed lazy restore
says of it is settled by Recovery.on_down, under the lock). The PIDs, signals and /proc
reads themselves are checkpointer.workloads'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from checkpointer.containers import ContainerRuntime
from checkpointer.engine.registry import Registry
from checkpointer.engine.restoring import LogPaths
from checkpointer.engine.workload import Workload, WorkloadState
from checkpointer.errors import TeardownFailed
from checkpointer.workloads import managed, process
from checkpointer.workloads.logs import LogPump

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(
        self,
        registry: Registry,
        pump: LogPump,
        logs: LogPaths,
        watch: Callable[[Workload], None],
        runtimes: Mapping[str, ContainerRuntime],
    ) -> None:
        self.runtimes = runtimes
        self.registry = registry
        self.pump = pump
        self.logs = logs
        self.watch = watch

    def start(self, w: Workload) -> None:
        """Start a managed workload's command (a new tree, no state)."""
        assert w.command
        self.pump.attach(w.name, self.logs.fifo(w.name), self.logs.log(w.name))
        pid = managed.launch(
            w.name, w.command, Path(w.cwd) if w.cwd else None, w.env, self.logs.fifo(w.name)
        )
        w.pid, w.started = pid, process.start_time(pid)
        w.state, w.exit_status, w.last_error = WorkloadState.RUNNING, None, None
        self.registry.save()
        self.watch(w)
        log.info("workload %s started: pid %d, command %s", w.name, pid, w.command)

    def teardown(self, w: Workload) -> None:
        """Stop the whole tree and wait until none of its PIDs is left."""
        assert w.pid is not None
        w.state = WorkloadState.STOPPING  # its death is ours: the supervisor must not restore it
        if w.container:
            self.runtimes[str(w.kind)].stop(w.container)  # its runtime cleans up after it
        left = process.teardown(w.pid, w.started)
        if left:
            raise TeardownFailed(
                f"workload {w.name}: processes {left} did not go away after SIGKILL; "
                "they may be stuck in the kernel (state D); check `ps -o pid,stat,cmd -p ...`"
            )
        w.state, w.exit_status = WorkloadState.STOPPED, "stopped by checkpointer"
        self.registry.save()

    def mark_dead(self, pid: int, status: int | None) -> Workload | None:
        """Record that a workload's root died (status None: not our child, status unknown).

        Returns the workload if this death is news: it was running and nobody stopped it.
        """
        w = self.registry.running_with_pid(pid)
        if w is None:
            return None
        if status is None:
            w.state, w.exit_status = WorkloadState.CRASHED, "exited (status unknown: not our child)"
        else:
            w.state = WorkloadState.EXITED if status == 0 else WorkloadState.CRASHED
            w.exit_status = process.describe_exit(status)
        log.warning("workload %s (pid %d) %s", w.name, pid, w.exit_status)
        try:
            self.registry.save()
        except OSError as e:  # the death is news whether or not the disk took it: restore it
            log.error("cannot save the registry (%s); workload %s is restored anyway", e, w.name)
        return w
