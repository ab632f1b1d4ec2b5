"""The one copy helper (storage/file_copy.py) that a rebuild from a seed folder and the disk
images use: when the kernel refuses copy_file_range for a pair of files (EXDEV across
filesystems, a tmpfs source), the bytes are still copied, to the offsets asked, by sendfile or
by read and write; a real I/O error and a source that ends early are errors, never a short
copy. (Across two real filesystems: tests/test_restore_findings.py.)"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import file_copy
from storage.file_copy import copy_range

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

MiB = 1024 * 1024


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[int, int, bytes]]:
    data = os.urandom(3 * MiB + 123)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(dst, 4 * MiB)
        yield src, dst, data
    finally:
        os.close(src)
        os.close(dst)


def _refuse(code: int, calls: list[str], name: str) -> object:
    def refused(*args: object) -> int:
        calls.append(name)
        raise OSError(code, os.strerror(code))

    return refused


@pytest.mark.parametrize("sendfile_too", [False, True], ids=["sendfile", "read-write"])
def test_a_copy_the_kernel_refuses_across_filesystems_is_still_made(
    files: tuple[int, int, bytes], monkeypatch: pytest.MonkeyPatch, sendfile_too: bool
) -> None:
    src, dst, data = files
    calls: list[str] = []
    monkeypatch.setattr(os, "copy_file_range", _refuse(errno.EXDEV, calls, "copy_file_range"))
    if sendfile_too:
        monkeypatch.setattr(os, "sendfile", _refuse(errno.EINVAL, calls, "sendfile"))
    monkeypatch.setattr(file_copy, "_BUFFER", 64 * 1024)  # several reads and writes
    assert copy_range(src, dst, 2 * MiB + 5, MiB - 3, 7) == 2 * MiB + 5
    assert os.pread(dst, 2 * MiB + 5, 7) == data[MiB - 3 : 3 * MiB + 2]
    assert os.pread(dst, 7, 0) == bytes(7)  # nothing before the offset asked
    # Refused once each, then not asked again for the rest of the copy.
    assert calls == (["copy_file_range", "sendfile"] if sendfile_too else ["copy_file_range"])
    with pytest.raises(OSError, match="ended 1000 bytes early"):
        copy_range(src, dst, 1123, 3 * MiB, 0)  # past the source's end


def test_a_real_io_error_is_raised_not_worked_around(
    files: tuple[int, int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, _ = files
    calls: list[str] = []
    monkeypatch.setattr(os, "copy_file_range", _refuse(errno.EIO, calls, "copy_file_range"))
    with pytest.raises(OSError) as err:
        copy_range(src, dst, MiB, 0, 0)
    assert err.value.errno == errno.EIO and calls == ["copy_file_range"]
