"""The few errors callers of storage/ branch on. Messages say what to do next."""


class StorageError(Exception):
    """Any failure of the repository or its backend."""


class BlobNotFound(StorageError):
    """The backend holds no blob under that key."""


class BlobExists(StorageError):
    """A create-only put found the key taken; keys are never overwritten."""


class PreconditionFailed(BlobExists):
    """A conditional write lost: the key exists (create-only) or changed since it was read."""


class ConditionalWritesUnsupported(StorageError):
    """The store cannot write "only if unchanged": leases (a fleet) cannot be kept there."""


class CheckpointNotFound(StorageError):
    """No committed checkpoint has that id (or the workload has none)."""


class CorruptCheckpoint(StorageError):
    """A checkpoint's manifest or one of its chunks does not match what was stored."""


class BlobTooLarge(CorruptCheckpoint):
    """A blob is larger than any the repository writes of its kind: refused unread."""


def too_large(key: str, size: int | None, limit: int) -> BlobTooLarge:
    """`size` None: a body whose length was not said, refused once it passed `limit`."""
    if size is None:
        return BlobTooLarge(
            f"{key} is more than the {limit} bytes any checkpointer writes for it: refused "
            "once that much was read (planted or damaged)"
        )
    return BlobTooLarge(
        f"{key} is {size} bytes, more than the {limit} any checkpointer writes for it: "
        "refused unread (planted or damaged)"
    )


class TransientStorageError(StorageError):
    """Worth retrying: throttling, a 5xx, a dropped connection, an unreachable endpoint."""


class StorageAccessError(StorageError):
    """Not worth retrying: bad credentials, no permission, no such bucket. Fix the config."""
