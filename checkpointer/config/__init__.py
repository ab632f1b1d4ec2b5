"""Configuration: the YAML schema (model), its value types (types) and duration/byte grammar
(durations). Everything the daemon accepts is validated here, with the key's path in errors."""

from checkpointer.config.model import (
    Config,
    CriuConfig,
    CriuOptions,
    MetricsConfig,
    Retention,
    RetryConfig,
    S3Config,
    StorageConfig,
    WorkloadConfig,
    WorkloadOptions,
    format_validation_error,
    load_config,
)

__all__ = [
    "Config",
    "CriuConfig",
    "CriuOptions",
    "MetricsConfig",
    "Retention",
    "RetryConfig",
    "S3Config",
    "StorageConfig",
    "WorkloadConfig",
    "WorkloadOptions",
    "format_validation_error",
    "load_config",
]
