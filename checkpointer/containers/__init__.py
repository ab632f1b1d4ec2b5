"""Containers as workloads: each runtime checkpoints and restores its own containers (by_kind
names them by kind; base holds what they share)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.containers.base import (
        ContainerError,
        ContainerRuntime,
        Problem,
        Tool,
        check_container_name,
    )
    from checkpointer.containers.by_kind import KINDS, runtimes

_WHERE = {
    "ContainerError": "checkpointer.containers.base",
    "ContainerRuntime": "checkpointer.containers.base",
    "Problem": "checkpointer.containers.base",
    "Tool": "checkpointer.containers.base",
    "check_container_name": "checkpointer.containers.base",
    "KINDS": "checkpointer.containers.by_kind",
    "runtimes": "checkpointer.containers.by_kind",
}

__getattr__ = lazy_exports(__name__, _WHERE)  # names load on first use


__all__ = [
    "KINDS",
    "ContainerError",
    "ContainerRuntime",
    "Problem",
    "Tool",
    "check_container_name",
    "runtimes",
]
