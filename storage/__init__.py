"""Content-addressed, deduplicated storage of folders of files as checkpoints.

This package knows nothing of CRIU or processes: it stores a folder under a workload name and
gives it back, byte for byte, verified. See `repository.Repository`.
"""

from storage.errors import (
    BlobExists,
    BlobNotFound,
    CheckpointNotFound,
    CorruptCheckpoint,
    StorageError,
)
from storage.manifest import Manifest
from storage.repository import Repository

__all__ = [
    "BlobExists",
    "BlobNotFound",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "Manifest",
    "Repository",
    "StorageError",
]
