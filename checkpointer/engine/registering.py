"""Bringing a tree under the daemon's care: start a managed one, adopt one by PID."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from checkpointer.config import WorkloadOptions
from checkpointer.containers import ContainerError, ContainerRuntime, check_container_name
from checkpointer.criu import CriuError
from checkpointer.criu.failures import CriuFailure
from checkpointer.engine.parts import Hooks, Workloads
from checkpointer.engine.workload import Workload, WorkloadKind, WorkloadState
from checkpointer.errors import (
    CheckpointerError,
    ProcessNotFound,
    WorkloadExists,
    WorkloadNotRunning,
)
from checkpointer.workloads import process, users
from storage import StorageError
from storage.manifest import check_workload_name

if TYPE_CHECKING:
    from checkpointer.engine.ownership import Ownership

log = logging.getLogger(__name__)


class Registering:
    """Start a managed tree, adopt one by PID, watch a container."""

    def __init__(
        self,
        workloads: Workloads,
        ownership: Ownership,
        runtimes: Mapping[str, ContainerRuntime],
        hooks: Hooks,
    ) -> None:
        self.workloads = workloads
        self.ownership = ownership
        self.runtimes = runtimes
        self.hooks = hooks

    def run(
        self,
        name: str,
        command: list[str],
        options: WorkloadOptions,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Workload:
        """Start `command` as a managed workload and register it; nothing stays registered if the
        start fails. Refused when its checkpoints could never succeed here (users.init_refusal)."""
        refusal = users.init_refusal(command)
        if refusal is not None:
            raise CriuError(
                f"workload {name} cannot be checkpointed: {refusal}",
                CriuFailure.NEEDS_CAP_SYS_RESOURCE,
            )
        w = Workload(
            name=name,
            kind=WorkloadKind.MANAGED,
            command=list(command),
            cwd=cwd,
            env=dict(env or {}),
        )
        self.workloads.add(w, options)
        try:
            self.ownership.claim(name)
            with self.workloads.locked(w, wait=True):
                self.workloads.start(w)
        except (CheckpointerError, StorageError):
            self.workloads.forget(w)
            raise
        self.workloads.scheduled(w)
        return w

    def register(
        self,
        name: str,
        *,
        pid: int | None = None,
        pidfile: str | None = None,
        options: WorkloadOptions,
    ) -> Workload:
        """Adopt a process tree started elsewhere."""
        check_workload_name(name)
        if pidfile is not None:
            try:
                pid = int(Path(pidfile).read_text().split()[0])
            except (OSError, ValueError, IndexError) as e:
                raise ProcessNotFound(f"cannot read a PID from pidfile {pidfile}: {e}") from e
        if pid is None or pid <= 0 or not process.is_alive(pid):
            raise ProcessNotFound(
                f"no running process has PID {pid}; check the PID "
                "(`ps -p PID`) and register a live process"
            )
        if pid == os.getpid():
            raise ProcessNotFound("cannot register the checkpointer daemon itself")
        blocker = users.dump_blocker(pid)
        if blocker is not None:  # a workload that can never be checkpointed is worse than none
            raise CriuError(
                f"workload {name} cannot be checkpointed: {blocker.message}", blocker.category
            )
        w = self._watch_running(name, WorkloadKind.ADOPTED, pid, options)
        log.info("workload %s adopted: pid %d", name, pid)
        return w

    def register_container(
        self, name: str, kind: WorkloadKind, container: str, options: WorkloadOptions
    ) -> Workload:
        """Watch and checkpoint a running container. Refused, with the line to change, when its
        set-up is known to make checkpoints or restores fail: a workload that can never be
        restored is worse than none."""
        check_workload_name(name)
        check_container_name(container)
        for other in self.workloads.workloads():
            if other.kind is kind and other.container == container:
                raise WorkloadExists(
                    f"{kind} container {container} is already registered as {other.name}"
                )
        runtime = self.runtimes[str(kind)]
        problems = runtime.problems(container)
        if problems:
            raise ContainerError(
                f"{kind} container {container} cannot be checkpointed: "
                + "; ".join(str(p) for p in problems),
                CriuFailure.CONFIG,
            )
        pid = runtime.pid(container)
        if pid is None:
            raise WorkloadNotRunning(
                f"{kind} container {container} is not running; start it first"
                + (f" (`lxc-start -n {container}`)" if kind is WorkloadKind.LXC else "")
                + (f" (`podman start {container}`)" if kind is WorkloadKind.PODMAN else "")
            )
        w = self._watch_running(name, kind, pid, options, container)
        log.info("workload %s: %s container %s, init pid %d", name, kind, container, pid)
        return w

    def _watch_running(
        self,
        name: str,
        kind: WorkloadKind,
        pid: int,
        options: WorkloadOptions,
        container: str | None = None,
    ) -> Workload:
        """Register a tree that runs already (adopted, or a container's): lease, watch, schedule."""
        self.ownership.claim(name)
        w = Workload(
            name=name,
            kind=kind,
            container=container,
            pid=pid,
            started=process.start_time(pid),
            state=WorkloadState.RUNNING,
        )
        self.workloads.add(w, options)
        self.hooks.watch(w)
        self.workloads.scheduled(w)
        return w
