"""The container runtimes by kind: the one place that names them all."""

from __future__ import annotations

from pathlib import Path

from checkpointer.containers.base import ContainerRuntime, Tool
from checkpointer.containers.lxc import Lxc
from checkpointer.containers.podman import Podman

KINDS = ("lxc", "podman")


def runtimes(failed_logs_dir: Path, timeout: float = 600.0) -> dict[str, ContainerRuntime]:
    """One runtime per container kind, their failed runs' logs kept in `failed_logs_dir`."""
    tool = Tool(failed_logs_dir, timeout)
    return {"lxc": Lxc(tool), "podman": Podman(tool)}
