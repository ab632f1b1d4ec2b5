"""The pure parts of container workloads: the aligned rootfs archive (and that a hostile one
writes nothing outside its folder), LXC config rules, Podman's export layout, and the one-line
errors made of a runtime's output."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from checkpointer.containers import lxc_config, podman_export, rootfs_archive, rootfs_extract
from checkpointer.containers.base import ContainerError, check_container_name, failure
from checkpointer.containers.podman_export import pack as _pack_export
from checkpointer.containers.podman_export import unpack as _unpack_export
from checkpointer.criu import DumpOptions


def tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    for i, size in enumerate((1, 700, 5000, 9000, 0, 70000)):
        (root / "usr" / "bin" / f"f{i}").write_bytes(os.urandom(size))
    (root / "usr" / "bin" / "f3").chmod(0o4755)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")  # the container's /
    os.link(root / "usr" / "bin" / "f1", root / "etc" / "hard")
    os.mkfifo(root / "fifo")


def chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [hashlib.sha256(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]


def test_every_file_starts_on_a_page_and_the_tree_comes_back_as_it_was(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tree(src)
    rootfs_archive.write(src, tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        regular = [m for m in tar.getmembers() if m.isreg() and m.size and not m.islnk()]
        assert len(regular) == 6 and all(m.offset_data % 4096 == 0 for m in regular)
    out.mkdir()
    rootfs_extract.extract(tmp_path / "a.tar", out)
    for rel in ("usr/bin/f0", "usr/bin/f5", "etc/passwd"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert (out / "usr/bin/f3").stat().st_mode & 0o7777 == 0o4755  # setuid kept
    assert os.readlink(out / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert (out / "etc/hard").stat().st_ino == (out / "usr/bin/f1").stat().st_ino
    assert (out / "fifo").is_fifo()


def test_an_unchanged_rootfs_is_the_same_bytes_and_a_grown_file_costs_only_its_pages(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    tree(src)
    rootfs_archive.write(src, tmp_path / "1.tar")
    rootfs_archive.write(src, tmp_path / "2.tar")
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    with open(src / "usr" / "bin" / "f1", "ab") as f:  # sorted early: a plain tar shifts the rest
        f.write(b"x")
    rootfs_archive.write(src, tmp_path / "3.tar")
    before, after = set(chunks(tmp_path / "1.tar")), chunks(tmp_path / "3.tar")
    new = [c for c in after if c not in before]
    assert len(after) > 25 and len(new) <= 4, (len(after), len(new))


def hostile(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


OUTSIDE = "<the test's folder>/outside"  # the symlink's absolute target, set per test


def sym(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    "members",
    [
        [(tarfile.TarInfo("../escaped"), b"x")],
        [(sym("etc", OUTSIDE), b""), (tarfile.TarInfo("etc/escaped"), b"x")],
        [(sym("up", "../.."), b""), (tarfile.TarInfo("up/escaped"), b"x")],
    ],
    ids=["dot-dot", "through-absolute-symlink", "through-relative-symlink"],
)
def test_a_hostile_archive_is_refused_and_writes_nothing_outside(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    (tmp_path / "in" / "deep").mkdir(parents=True)
    dest = tmp_path / "in" / "deep"
    outside = tmp_path / "outside"  # an absolute path of this test's own, never a shared one
    hostile(
        tmp_path / "h.tar",
        [(sym(i.name, str(outside)) if i.linkname == OUTSIDE else i, d) for i, d in members],
    )
    with pytest.raises(rootfs_extract.UnsafeArchive):
        rootfs_extract.extract(tmp_path / "h.tar", dest)
    assert not list(tmp_path.rglob("escaped"))
    assert not outside.exists()


def test_an_absolute_member_name_lands_inside_the_folder(tmp_path: Path) -> None:
    hostile(tmp_path / "h.tar", [(tarfile.TarInfo("/abs/inside"), b"x")])
    (tmp_path / "dest").mkdir()
    rootfs_extract.extract(tmp_path / "h.tar", tmp_path / "dest")
    assert (tmp_path / "dest" / "abs" / "inside").read_bytes() == b"x"
    assert not Path("/abs/inside").exists()


def test_lxc_config_lines_known_to_fail_are_named_with_their_fix(tmp_path: Path) -> None:
    (tmp_path / "common.conf").write_text("lxc.pty.max = 1024\n")
    (tmp_path / "config").write_text(
        f"lxc.include = {tmp_path / 'common.conf'}\n"
        "lxc.rootfs.path = dir:/var/lib/lxc/c/rootfs\n"
        "lxc.tty.max = 4\n"
        "lxc.mount.entry = /lib lib none bind,ro 0 0\n"
        "lxc.init.cmd = /sbin/init\n"
    )
    problems = lxc_config.problems(lxc_config.read(tmp_path / "config"))
    text = "\n".join(str(p) for p in problems)
    assert f"{tmp_path}/config:3: `lxc.tty.max = 4`" in text and "set `lxc.tty.max = 0`" in text
    assert f"{tmp_path}/common.conf:1: `lxc.pty.max = 1024`" in text
    assert "set `lxc.pty.max = 1`" in text
    if os.path.islink("/lib"):
        assert "source /lib is a symlink" in text and "use the real path (/usr/lib)" in text
    assert "systemd as the container's init" in text
    ok = lxc_config.parse("lxc.rootfs.path = dir:/r\nlxc.tty.max = 0\nlxc.pty.max = 1\n", "c")
    assert lxc_config.problems(ok) == []
    assert "is not a `dir:` folder" in str(lxc_config.problems(lxc_config.parse("", "c")))


def test_a_restored_lxc_config_points_at_this_hosts_rootfs() -> None:
    text = "lxc.uts.name = c\nlxc.rootfs.path = dir:/elsewhere/rootfs\nlxc.tty.max = 0\n"
    new = lxc_config.with_rootfs(text, Path("/var/lib/lxc/c/rootfs"))
    assert "lxc.rootfs.path = dir:/var/lib/lxc/c/rootfs" in new and "/elsewhere" not in new
    assert lxc_config.rootfs_path(lxc_config.parse(new, "c")) == Path("/var/lib/lxc/c/rootfs")


def test_runtime_failures_are_one_line_with_the_fix() -> None:
    e = failure(
        "lxc-checkpoint dump of c failed",
        "Error (criu/tty.c:1): tty: Unable to find a master",
        None,
    )
    assert e.category == "tty" and "lxc.tty.max = 0" in str(e)
    e = failure("podman restore of p failed", 'Error: "localhost/x:1": image not known', None)
    assert e.category == "image-missing" and "podman load" in str(e)
    pull = "Trying to pull localhost/app:1...\nError: initializing source docker://localhost/app:1"
    e = failure("podman restore of p failed", pull, None)
    assert e.category == "image-missing" and "`podman save -o F localhost/app:1`" in str(e)
    e = failure("x failed", "Error (criu/files-reg.c:2): File a/b has bad size 10 (expect 4)", None)
    assert e.category == "file-changed"
    assert "\n" not in str(failure("x failed", "some\nlines\nError: it broke\nmore", None))


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-rf", "x" * 129, "a b"])
def test_container_names_that_are_not_one_safe_path_component_are_refused(bad: str) -> None:
    with pytest.raises(ContainerError):
        check_container_name(bad)


def test_podman_exports_round_trip_flat_and_refuse_what_cannot_be_restored(tmp_path: Path) -> None:
    export = tmp_path / "export.tar"
    with tarfile.open(export, "w") as tar:
        for name in ("artifacts", "checkpoint"):
            d = tarfile.TarInfo(name)
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in (
            ("config.dump", b"{}"),
            ("stats-dump", b"s"),
            ("checkpoint/pages-1.img", b"p" * 8192),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    images = tmp_path / "images"
    images.mkdir()
    _unpack_export(export, images)
    assert sorted(os.listdir(images)) == ["pages-1.img", "podman.config.dump", "stats-dump"]
    _pack_export(images, tmp_path / "again.tar")
    with tarfile.open(tmp_path / "again.tar") as tar:
        assert sorted(tar.getnames()) == sorted(
            ["artifacts", "checkpoint", "checkpoint/pages-1.img", "config.dump", "stats-dump"]
        )
    with tarfile.open(export, "a") as tar:
        info = tarfile.TarInfo("volumes/data.tar")
        tar.addfile(info, io.BytesIO(b""))
    (images2 := tmp_path / "images2").mkdir()
    with pytest.raises(ContainerError, match=r"volumes/data\.tar"):
        _unpack_export(export, images2)


def test_podmans_import_gets_the_whole_tar_each_time_it_opens_the_fifo(tmp_path: Path) -> None:
    """Podman 4.3's import opens its input three times by path: every open gets the whole
    tar (streamed, no copy of the image made first), nothing is left behind, and a stream
    that cannot be made (the dead container's `podman rm` failed, a file shrank) never
    leaves a reader waiting: it gets no tar or a short one, and the cause is raised."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(os.urandom(3 << 20))
    (images / "podman.config.dump").write_text("{}")
    (images / "stats-dump").write_bytes(b"s")

    def cat(fifo: Path) -> bytes:
        return subprocess.run(["cat", str(fifo)], capture_output=True, timeout=30).stdout

    with podman_export.packed(images, tmp_path) as tar:
        podman_export.pack(images, tmp_path / "file.tar")
        with podman_export.served(tar, tmp_path / "in.tar", grace=0.1) as fifo:
            got = [cat(fifo) for _ in range(3)]
        assert sorted(os.listdir(tmp_path)) == ["file.tar", "images"]
        with podman_export.served(tar, tmp_path / "in.tar", lambda: False, 0.1) as fifo:
            assert cat(fifo) == b""
    with tarfile.open(tmp_path / "file.tar") as whole:
        names = sorted(whole.getnames())
    for data in got:
        with tarfile.open(fileobj=io.BytesIO(data)) as read:
            assert sorted(read.getnames()) == names
            pages = read.extractfile("checkpoint/pages-1.img")
            assert pages is not None and pages.read() == (images / "pages-1.img").read_bytes()
    with podman_export.packed(images, tmp_path) as tar:
        os.truncate(images / "pages-1.img", 1 << 20)
        fifo = tmp_path / "in.tar"
        with pytest.raises(ContainerError, match="ended early"), podman_export.served(tar, fifo):
            assert len(cat(fifo)) < 3 << 20 and cat(fifo) == b""
    assert sorted(os.listdir(tmp_path)) == ["file.tar", "images"]


def test_copy_range_works_across_filesystems(tmp_path: Path) -> None:
    """A rootfs on disk archived into /dev/shm: copy_file_range refuses (EXDEV) and the
    copy goes on with sendfile."""
    from checkpointer.containers.base import copy_range

    data = os.urandom(3 * 1024 * 1024 + 5)
    shm = Path("/dev/shm") / f"ckpt-test-copy-{os.getpid()}"
    shm.write_bytes(data)
    try:
        with open(shm, "rb") as src, open(tmp_path / "out", "wb") as dst:
            assert copy_range(src.fileno(), dst.fileno(), 5, len(data)) == len(data) - 5
        assert (tmp_path / "out").read_bytes() == data[5:]
    finally:
        shm.unlink()


def test_a_restored_lxc_config_adds_no_hook_and_no_host_mount_the_host_lacks(
    tmp_path: Path,
) -> None:
    """Whoever can write a repository in clear could put a hook into a checkpoint's config:
    only the lines the host's own config has may come back, LXC's packaged includes too."""
    host = tmp_path / "lxc" / "c" / "config"
    host.parent.mkdir(parents=True)
    host.write_text(
        f"lxc.rootfs.path = dir:{host.parent}/rootfs\n"
        "lxc.mount.entry = /srv/data srv/data none bind 0 0\n"
    )
    restored = (
        "lxc.include = /usr/share/lxc/config/common.conf\n"  # packaged: LXC's own
        "lxc.mount.entry = /srv/data  srv/data none bind 0 0\n"  # the host has it
        "lxc.mount.entry = proc dev/.lxc/proc proc create=dir,optional 0 0\n"  # no host path
        "lxc.mount.entry = /etc etc2 none bind 0 0\n"
        "lxc.hook.pre-start = /tmp/evil\n"
        "lxc.net.0.script.up = /tmp/evil\n"
        "lxc.include = /var/lib/lxc/other/config\n"
        "lxc.log.file = /etc/shadow\n"
    )
    added = lxc_config.added_host_access(restored, lxc_config.read_granted(host))
    assert [f"{ln.key} = {ln.value}" for ln in added] == [
        "lxc.mount.entry = /etc etc2 none bind 0 0",
        "lxc.hook.pre-start = /tmp/evil",
        "lxc.net.0.script.up = /tmp/evil",
        "lxc.include = /var/lib/lxc/other/config",
        "lxc.log.file = /etc/shadow",
    ]
    assert added[1].where == "the checkpoint's lxc.config:5"
    assert lxc_config.added_host_access(host.read_text(), lxc_config.read_granted(host)) == []
    # No config for the container on this host: nothing is granted.
    assert len(lxc_config.added_host_access(restored, [])) == 6


def test_an_lxc_restore_refuses_a_hook_the_host_lacks_and_writes_nothing(tmp_path: Path) -> None:
    from checkpointer.containers.base import Tool
    from checkpointer.containers.lxc import Lxc

    host = tmp_path / "lxc" / "c" / "config"
    host.parent.mkdir(parents=True)
    host.write_text(f"lxc.rootfs.path = dir:{host.parent}/rootfs\nlxc.tty.max = 0\n")
    images = tmp_path / "images"
    images.mkdir()
    (images / "lxc.config").write_text(host.read_text() + "lxc.hook.start-host = /tmp/evil\n")
    (images / "lxc.rootfs.tar").write_bytes(b"")
    lxc = Lxc(Tool(tmp_path / "failed"), lxc_path=tmp_path / "lxc")
    before = host.read_text()
    with pytest.raises(ContainerError) as e:
        lxc.restore("c", images, DumpOptions())
    assert "`lxc.hook.start-host = /tmp/evil` (the checkpoint's lxc.config:3)" in str(e.value)
    assert host.read_text() == before and not (tmp_path / "lxc" / "c" / "rootfs").exists()
