"""Blob stores: dumb bytes by key. One module per implementation, the interface in base.py."""

from storage.backends.base import BlobStore
from storage.backends.local import LocalBlobStore

__all__ = ["BlobStore", "LocalBlobStore"]
