"""Configuration: the YAML schema (model), reading a file into it (loading), its value types
(types) and duration/byte grammar (durations). Everything the daemon accepts is validated here,
with the key's path in errors.

Names load on first use (PEP 562): the commands that only talk to the daemon read the socket's
path (document.py) and durations without loading the schema and pydantic."""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.config.cron import check_cron
    from checkpointer.config.drill import DrillPolicy
    from checkpointer.config.loading import format_validation_error, load_config
    from checkpointer.config.model import (
        Config,
        CriuConfig,
        CriuOptions,
        FleetConfig,
        HostConfig,
        MetricsConfig,
        RestorePolicy,
        Retention,
        RetryConfig,
        S3Config,
        StorageConfig,
        WorkloadConfig,
        WorkloadOptions,
    )

_MODEL = "checkpointer.config.model"
_WHERE = {
    "check_cron": "checkpointer.config.cron",
    "DrillPolicy": "checkpointer.config.drill",
    "format_validation_error": "checkpointer.config.loading",
    "load_config": "checkpointer.config.loading",
    "Config": _MODEL,
    "CriuConfig": _MODEL,
    "CriuOptions": _MODEL,
    "FleetConfig": _MODEL,
    "HostConfig": _MODEL,
    "MetricsConfig": _MODEL,
    "RestorePolicy": _MODEL,
    "Retention": _MODEL,
    "RetryConfig": _MODEL,
    "S3Config": _MODEL,
    "StorageConfig": _MODEL,
    "WorkloadConfig": _MODEL,
    "WorkloadOptions": _MODEL,
}

__getattr__ = lazy_exports(__name__, _WHERE)  # names load on first use

__all__ = [
    "Config",
    "CriuConfig",
    "CriuOptions",
    "DrillPolicy",
    "FleetConfig",
    "HostConfig",
    "MetricsConfig",
    "RestorePolicy",
    "Retention",
    "RetryConfig",
    "S3Config",
    "StorageConfig",
    "WorkloadConfig",
    "WorkloadOptions",
    "check_cron",
    "format_validation_error",
    "load_config",
]
