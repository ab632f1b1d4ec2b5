"""Ranges of a checkpointed file read straight from the packs (the lazy restore's pages):
the same bytes as the file, in clear and sealed repositories, and a flipped byte refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import Repository
from storage.backends.local import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.errors import CorruptCheckpoint
from storage.file_reader import CheckpointFiles


def folder(path: Path) -> Path:
    path.mkdir()
    page = os.urandom(4096)
    # random pages, compressible pages, a repeated page, zero pages and a short tail
    data = os.urandom(300 * 4096) + b"x" * 200 * 4096 + page * 30 + bytes(40 * 4096) + b"end"
    (path / "pages-1.img").write_bytes(data)
    (path / "core-1.img").write_bytes(b"core" * 100)
    return path


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_ranges_read_back_exactly_what_was_stored(tmp_path: Path, sealed: bool) -> None:
    src = folder(tmp_path / "src")
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    files = CheckpointFiles(repo, "w", m.id)
    data = (src / "pages-1.img").read_bytes()
    for offset, length in ((0, 4096), (4096 * 299, 3 * 4096), (4096 * 500, 64 * 4096),
                           (len(data) - 4099, 4096 * 4), (123, 5000)):  # fmt: skip
        assert files.read("pages-1.img", offset, length) == data[offset : offset + length]
    assert files.read("core-1.img", 0, 400) == b"core" * 100
    assert files.size("pages-1.img") == len(data)


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_a_flipped_byte_in_a_pack_is_refused_not_returned(tmp_path: Path, sealed: bool) -> None:
    src = folder(tmp_path / "src")
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), **({"codec": codec} if codec else {}))
    m = repo.commit("w", src)
    packs = sorted((tmp_path / "repo").rglob("*.pack"))
    assert packs
    for pack in packs:
        raw = bytearray(pack.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        pack.write_bytes(bytes(raw))
    files = CheckpointFiles(repo, "w", m.id)
    with pytest.raises(CorruptCheckpoint):
        for offset in range(0, files.size("pages-1.img"), 64 * 4096):
            files.read("pages-1.img", offset, 64 * 4096)
