"""A disk slot written before a reboot is reused by the first checkpoint after it
(checkpointer/engine/disk_images.py `store`): its stamps say nothing of the disk under them
then (a writeback cut by a power loss, bit rot), so it is written whole, not only where the
pages changed. In the boot that writes it a slot is trusted by its stamps: a page left as the
disk had it would reach CRIU on a rollback to that checkpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from checkpointer.engine import kept_image
from checkpointer.engine.disk_images import DiskImages
from storage import Repository
from storage.backends import LocalBlobStore

PAGE = 4096


def test_a_slot_from_before_a_reboot_is_rewritten_whole_not_trusted_by_its_stamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setenv("CHECKPOINTER_BOOT_ID_FILE", str(boot))
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "image"
    src.mkdir(mode=0o700)
    pages = bytearray(os.urandom(64 * PAGE))
    (src / "pages-1.img").write_bytes(pages)
    disk = DiskImages(tmp_path / "images", 1)
    [old] = disk.store("web", [], src, repo.commit("web", src))
    # Under the file system, the stamps as recorded: page 10 is not what was written.
    with open(old.path / "pages-1.img", "r+b") as f:
        f.seek(10 * PAGE + 7)
        f.write(b"\x00\xff")
    old = dataclasses.replace(old, stamp=kept_image.stamp(old.path))
    boot.write_text("boot-2\n")
    pages[40 * PAGE : 41 * PAGE] = os.urandom(PAGE)  # page 10 unchanged since
    (src / "pages-1.img").write_bytes(pages)
    [new] = disk.store("web", [old], src, m := repo.commit("web", src))
    assert disk.find("web", [new], m.id) == new  # trusted in this boot, by its stamps
    assert (new.path / "pages-1.img").read_bytes() == bytes(pages), "the slot kept a bad page"
