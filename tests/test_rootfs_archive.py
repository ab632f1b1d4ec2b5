"""A container's rootfs through the archive and back: every attribute kept (judged by rsync,
not by our own code), hostile archives refused without a byte written outside, and a walk
that a running container cannot steer out of its rootfs."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from checkpointer.containers import rootfs_archive, rootfs_extract
from tests.support.containers import plant_attributes, rsync_differences


def test_every_attribute_comes_back_as_rsync_sees_it(tmp_path: Path) -> None:
    """setuid on a hard-linked binary (the busybox that failed with `bad mode`), a file
    capability, user. and trusted. xattrs, ACLs, a device node, a FIFO, times to the ns."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    plant_attributes(src)
    rootfs_archive.write(src, tmp_path / "a.tar")
    out.mkdir()
    rootfs_extract.extract(tmp_path / "a.tar", out)
    assert rsync_differences(src, out) == []
    assert (out / "srv/attrs/suid-link").stat().st_mode & 0o7777 == 0o6755
    assert os.getxattr(out / "srv/attrs/cap", "security.capability")


def test_gnu_tar_reads_the_archive_with_its_attributes(tmp_path: Path) -> None:
    """The format is GNU tar's and bsdtar's (pax, SCHILY.xattr): an operator can unpack a
    checkpoint's rootfs by hand."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    folder = plant_attributes(src)
    rootfs_archive.write(src, tmp_path / "a.tar")
    out.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
         str(tmp_path / "a.tar"), "-C", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    files = [ln for ln in rsync_differences(folder, out / "srv/attrs") if not ln.startswith(".d")]
    assert files == []  # folders' times are GNU tar's own business


def canary(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "canary"
    path.write_text("host file\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def hostile(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


CASES = {
    # The reproduced one: a hard link to a host file, then a regular file of its name.
    "hard-link-absolute": lambda c: [
        (member("x", tarfile.LNKTYPE, str(c)), b""),
        (member("x"), b"overwritten\n"),
    ],
    "hard-link-dot-dot": lambda c: [
        (member("x", tarfile.LNKTYPE, f"../{c.name}"), b""),
        (member("x"), b"overwritten\n"),
    ],
    "hard-link-to-symlink": lambda c: [
        (member("s", tarfile.SYMTYPE, str(c)), b""),
        (member("x", tarfile.LNKTYPE, "s"), b""),
        (member("x"), b"overwritten\n"),
    ],
    "symlink-folder-then-file-beneath": lambda c: [
        (member("d", tarfile.SYMTYPE, str(c.parent)), b""),
        (member(f"d/{c.name}"), b"overwritten\n"),
    ],
    "name-over-path-max": lambda c: [
        (member("/".join(["a" * 200] * 25) + "/x"), b"x"),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_archive_is_refused_naming_the_member_and_writes_nothing_outside(
    tmp_path: Path, case: str
) -> None:
    dest = tmp_path / "rootfs"
    dest.mkdir()
    path, digest = canary(tmp_path)
    members = CASES[case](path)
    hostile(tmp_path / "h.tar", members)
    with pytest.raises(rootfs_extract.UnsafeArchive) as e:
        rootfs_extract.extract(tmp_path / "h.tar", dest)
    named = [m.name[:100] for m, _ in members]
    assert any(f"member '{n}" in str(e.value) for n in named), str(e.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(tmp_path)) == ["canary", "h.tar", "rootfs"]


# Swaps two names atomically (renameat2 RENAME_EXCHANGE) in a loop: "data" is a folder one
# moment and a symlink to the host's files the next. A process of its own, not a thread, so
# that it runs while the walk runs (a thread would wait for the GIL).
SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(sys.argv[1])
while True:
    if libc.renameat2(-100, b"data", -100, b"evil", 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
"""


def test_a_folder_swapped_for_a_symlink_while_archived_brings_no_host_file(
    tmp_path: Path,
) -> None:
    """A running container swaps a folder and a symlink to the host's files in a loop while its
    rootfs is archived: nothing of the host ends up in the archive (the walk by path archived
    host files in 3 runs of 10 and failed in 5 more)."""
    host = tmp_path / "host"
    host.mkdir()
    for i in range(50):  # the same names as the container's, so a walk by path finds them
        (host / f"f{i}").write_text("host secret\n")
    (host / "host-secret").write_text("host secret\n")
    root = tmp_path / "rootfs"
    (root / "data").mkdir(parents=True)
    for i in range(50):
        (root / "data" / f"f{i}").write_text("mine\n")
    (root / "evil").symlink_to(host)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root)])
    try:
        for i in range(100):
            rootfs_archive.write(root, tmp_path / f"{i}.tar")
            with tarfile.open(tmp_path / f"{i}.tar") as tar:
                names = tar.getnames()
                data = [tar.extractfile(m).read() for m in tar if m.isreg()]  # type: ignore[union-attr]
            (tmp_path / f"{i}.tar").unlink()
            assert not any("host-secret" in n for n in names), names
            assert b"host secret\n" not in data
        assert swapper.poll() is None  # it swapped all along
    finally:
        swapper.kill()
        swapper.wait()
