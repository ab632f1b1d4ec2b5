"""A folder on a local (or mounted) file system as a blob store: the embedded default."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from storage.backends.base import BlobStore
from storage.errors import BlobExists, BlobNotFound, PreconditionFailed, StorageError, too_large

_TMP_PREFIX = ".tmp-"


class LocalBlobStore(BlobStore):
    """Blobs as files under `root`; folders 0700, files 0600 (they hold process memory).

    Atomicity and create-only come from writing a temporary file, fsyncing it, and `link()`ing
    it into place: link fails if the name exists, and readers never see a partial file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
        except OSError as e:
            raise StorageError(
                f"cannot use {self.root} as the repository folder: {e.strerror}; "
                "check the path and its permissions (storage.path in the config)"
            ) from e

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"invalid blob key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.put_pieces(key, lambda: (data,))

    def put_pieces(self, key: str, pieces: Callable[[], Iterable[bytes | memoryview]]) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = final.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0, closefd=True) as f:
                for piece in pieces():
                    view = memoryview(piece)
                    while view:  # a raw write may take less than it was given
                        n = f.write(view)
                        if not n:
                            raise StorageError(f"cannot write {tmp}: nothing was written")
                        view = view[n:]
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError as e:
                raise BlobExists(f"blob {key} already exists") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(final.parent)

    def get(self, key: str, limit: int | None = None) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise BlobNotFound(f"blob {key} not found in {self.root}") from e
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise too_large(key, size, limit)
            return f.read()

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise BlobNotFound(f"blob {key} not found in {self.root}") from e
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise too_large(key, size, limit)
            view = memoryview(buffer(size))[:size]
            got = 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
            return view[:got]  # shorter only if the file shrank meanwhile: its reader finds out

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise BlobNotFound(f"blob {key} not found in {self.root}") from e
        try:
            size = os.fstat(fd).st_size
            parts, at, end = [], offset, min(offset + length, size)
            while at < end and (part := os.pread(fd, end - at, at)):
                parts.append(part)
                at += len(part)
            return b"".join(parts), size
        finally:
            os.close(fd)

    def modified(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key)).st_mtime
        except FileNotFoundError:
            return None

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        data = self.get(key, limit)
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        """Compare and replace under an flock of the folder: atomic among processes of hosts
        that share this file system's locks (one host, in practice)."""
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(self.root / f"{_TMP_PREFIX}conditional.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current: str | None = hashlib.sha256(final.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != match:
                raise PreconditionFailed(f"{key} changed since it was read")
            tmp = final.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            return hashlib.sha256(data).hexdigest()
        finally:
            os.close(lock)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        # Walk only the deepest folder the prefix names, not the whole repository.
        folder, _, _ = prefix.rpartition("/")
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return
        for dirpath, _dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Each blob's content hash, as `get_versioned` and `put_if` give it (a local folder
        keeps no ETags: the blobs listed are read, which is cheap here)."""
        for key in self.list(prefix):
            try:
                data = self._path(key).read_bytes()
            except FileNotFoundError:
                continue  # removed since it was listed
            yield key, hashlib.sha256(data).hexdigest()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
