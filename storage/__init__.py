"""Content-addressed, deduplicated storage of folders of files as checkpoints.

This package knows nothing of CRIU or processes: it stores a folder under a workload name and
gives it back, byte for byte, verified. See `repository.Repository`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storage.errors import (
    BlobExists,
    BlobNotFound,
    CheckpointNotFound,
    CorruptCheckpoint,
    StorageError,
)

if TYPE_CHECKING:
    from storage.manifest import Manifest
    from storage.repository import Repository

# Imported when first used: the repository pulls in numpy and the codecs (0.15 s), which the
# command-line client, reading only the config and errors, never needs.
_LAZY = {"Manifest": "storage.manifest", "Repository": "storage.repository"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")


__all__ = [
    "BlobExists",
    "BlobNotFound",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "Manifest",
    "Repository",
    "StorageError",
]
