"""Configuration: the YAML schema (model), reading a file into it (loading), its value types
(types) and duration/byte grammar (durations). Everything the daemon accepts is validated here,
with the key's path in errors."""

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
