"""Reading a checkpoint's image folder for a commit: its files, and full blocks of them."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

from storage.errors import StorageError


def read_full(f: io.FileIO, buf: bytearray) -> int:
    """Fill `buf` unless the file ends first: chunks must start at multiples of CHUNK_SIZE."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def image_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """The regular files of `folder`, sorted, as (name, path). A checkpoint is a flat folder
    (CRIU's image folder): a subfolder is refused rather than silently left out."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            raise StorageError(f"{folder} has a subfolder {e.name}: checkpoints are flat folders")
        if e.is_file(follow_symlinks=False):
            yield e.name, Path(e.path)
