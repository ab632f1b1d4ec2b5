"""A Podman container's files after a crash and the daemon's restore, attribute by attribute,
judged by `rsync -aHAX`. Podman 4.3's own rootfs export (`rootfs-diff.tar`) loses POSIX ACLs
and `trusted.*` attributes (rsync itemizes `.f.......a. acl`, `.d.......a. acl-dir/`,
`.f........x xattr` without the service's help): the service adds them to the diff at
checkpoint (containers/podman_rootfs.py), and Podman's import applies them. A diff that
comes back from the repository tampered with is refused before Podman unpacks it as root."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from checkpointer.containers.base import ContainerError, Tool
from checkpointer.containers.podman import Podman
from checkpointer.criu import DumpOptions
from tests.support import Daemon, free_port
from tests.support.containers import (
    plant_attributes,
    podman,
    podman_container,
    podman_pid,
    restored_since,
    rsync_differences,
)


@contextmanager
def mounted(name: str) -> Iterator[Path]:
    """The container's merged rootfs as the host sees it (`podman mount`)."""
    path = Path(podman("mount", name).stdout.strip())
    try:
        yield path
    finally:
        podman("umount", name, check=False)


def test_podman_rootfs_comes_back_with_every_attribute(daemon: Daemon, tmp_path: Path) -> None:
    """A setuid+setgid file with a second hard-linked name, a file capability, `user.` and
    `trusted.` xattrs, an ACL and a default ACL, a device node, a FIFO, a sticky folder, a
    symlink: all equal after `podman kill` and the daemon's restore."""
    name = f"ckt-podattr-{os.getpid()}"
    reference = tmp_path / "reference"
    with podman_container(name, free_port()):
        pid = podman_pid(name)
        plant_attributes(Path(f"/proc/{pid}/root"))
        with mounted(name) as root:
            subprocess.run(["rsync", "-aHAX", f"{root}/srv/attrs/", f"{reference}/"], check=True)
        daemon.cli("register", "web", "--podman", name, "--every", "1h")
        st = daemon.status("web")
        daemon.checkpoint("web")
        podman("kill", name)
        st = daemon.wait_for("web", lambda s: restored_since(s, st), timeout=60)
        assert st["restores"][-1]["reason"] == "crash", st["restores"]
        with mounted(name) as root:
            restored = root / "srv/attrs"
            assert rsync_differences(reference, restored) == []
            assert os.getxattr(restored / "xattr", "trusted.note") == b"\x00\xffbinary"
            assert os.getxattr(restored / "acl", "system.posix_acl_access") == os.getxattr(
                reference / "acl", "system.posix_acl_access"
            )
            assert (restored / "suid-link").stat().st_mode & 0o7777 == 0o6755
            assert (restored / "suid").stat().st_ino == (restored / "suid-link").stat().st_ino


def test_a_tampered_rootfs_diff_never_reaches_podman(tmp_path: Path) -> None:
    """A stored diff with a member `var/run/X` (tried before the check: Podman's import wrote
    the host's /run/X, through the image's /var/run -> /run) is refused before Podman runs:
    nothing written on the host, the dead container not removed."""
    name = f"ckt-podtamper-{os.getpid()}"
    canary = Path(f"/run/ckt-canary-{os.getpid()}")
    runtime = Podman(Tool(tmp_path / "logs"))
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "logs").mkdir()
    with podman_container(name, free_port()):
        Path(f"/proc/{podman_pid(name)}/root/srv/note").write_text("a rootfs diff\n")
        runtime.checkpoint(name, images, DumpOptions())
        with tarfile.open(images / "podman.rootfs-diff.tar", "a") as diff:
            member = tarfile.TarInfo(f"var/run/{canary.name}")
            member.size = 6
            diff.addfile(member, io.BytesIO(b"owned\n"))
        runtime.stop(name)
        try:
            with pytest.raises(ContainerError, match=f"var/run/{canary.name}"):
                runtime.restore(name, images, DumpOptions())
            assert not canary.exists()
            assert podman("container", "exists", name, check=False).returncode == 0
        finally:
            canary.unlink(missing_ok=True)
