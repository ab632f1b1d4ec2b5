"""The kept image is trusted only inside folders that are the daemon's alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from checkpointer.engine import kept_image
from checkpointer.engine.kept_image import KeptImage

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def make_kept(root: Path) -> KeptImage:
    hot = root / "hot" / "web"
    for p in (root, root / "hot", hot):
        p.mkdir(mode=0o700)
    (hot / "pages-1.img").write_bytes(b"x" * 4096)
    return KeptImage("c1", hot, kept_image.stamp(hot))


def test_a_kept_image_in_our_own_folders_is_trusted(tmp_path: Path) -> None:
    kept = make_kept(tmp_path / "scratch")
    assert kept.intact()
    kept_image.drop(kept)
    assert not kept.path.exists()


def test_a_symlinked_hot_folder_is_neither_trusted_nor_removed(tmp_path: Path) -> None:
    """After a reboot someone else created the scratch root with `hot` pointing at a folder
    of theirs (or of the system's): the registry's kept path must not be read or removed."""
    root = tmp_path / "scratch"
    kept = make_kept(root)
    victim = tmp_path / "victim"
    (victim / "web").mkdir(parents=True, mode=0o700)
    (victim / "web" / "pages-1.img").write_bytes(b"x" * 4096)
    os.rename(root / "hot", tmp_path / "old-hot")
    os.symlink(victim, root / "hot")
    assert not kept.intact()
    kept_image.drop(kept)
    assert (victim / "web" / "pages-1.img").exists()


def test_a_root_folder_owned_by_another_user_is_not_trusted(tmp_path: Path) -> None:
    kept = make_kept(tmp_path / "scratch")
    if os.geteuid() == 0:
        os.chown(tmp_path / "scratch", 65534, 65534)
    else:
        os.chmod(tmp_path / "scratch", 0o755)
    assert not kept.intact()
    kept_image.drop(kept)
    assert kept.path.exists()
