"""Podman's rootfs diff as the service stores and hands it back (containers/podman_rootfs.py):
the attributes Podman's export leaves out added from the container's files, and a diff from
the repository checked before Podman's import unpacks it as root. The end-to-end check (a
real Podman container, restored, compared with rsync) is test_containers_podman_attrs.py."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from checkpointer.containers import podman_export, podman_rootfs
from checkpointer.containers.base import ContainerError
from tests.support.containers import plant_attributes

ACL = b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"  # user::rw-


def diff_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A tar as Podman's export would hold it (or as a hostile repository would)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", **xattrs: bytes
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755
    info.pax_headers = {
        f"SCHILY.xattr.{k.replace('__', '.')}": v.decode("utf-8", "surrogateescape")
        for k, v in xattrs.items()
    }
    return info


def rewritten(
    tmp_path: Path,
    data: bytes,
    extra: podman_rootfs.Extra | None = None,
    name: str = "out",
    beneath: podman_rootfs.Beneath | None = None,
) -> bytes:
    src, dst = tmp_path / f"{name}.in", tmp_path / name
    src.write_bytes(b"\0" * 512 + data)  # the diff inside a larger file, as in the export
    with open(src, "rb") as s, open(dst, "wb") as d:
        podman_rootfs.rewrite(s.fileno(), 512, len(data), d.fileno(), extra, beneath)
    dst.with_name(f"{name}.in").unlink()
    data = dst.read_bytes()
    dst.unlink()
    return data


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        return {m.name: m for m in tar}


def test_the_diff_gets_the_acls_and_trusted_attributes_podman_leaves_out(
    tmp_path: Path,
) -> None:
    """Read from the container's files below the merged rootfs; Podman's own records win,
    a hard link carries none (its inode has them), and a diff written again is the same
    bytes (an unchanged rootfs costs nothing new in the repository)."""
    root = tmp_path / "merged"
    plant_attributes(root)
    podmans = diff_of(
        [
            (entry("srv/attrs", tarfile.DIRTYPE), b""),
            (entry("srv/attrs/acl"), b"a\n"),
            (entry("srv/attrs/acl-dir", tarfile.DIRTYPE), b""),
            (entry("srv/attrs/xattr", user__note=b"podman's"), b"x\n"),
            (entry("srv/attrs/suid"), b"s"),
            (entry("srv/attrs/suid-link", tarfile.LNKTYPE, "srv/attrs/suid"), b""),
            (entry("srv/attrs/gone"), b"removed since the export"),
        ]
    )
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        once = rewritten(tmp_path, podmans, podman_rootfs.FromContainer(fd))
        again = rewritten(tmp_path, podmans, podman_rootfs.FromContainer(fd), "again")
    finally:
        os.close(fd)
    found = members(once)
    attrs = root / "srv/attrs"

    def xattr(name: str, attr: str) -> bytes:
        return found[name].pax_headers[f"SCHILY.xattr.{attr}"].encode("utf-8", "surrogateescape")

    assert xattr("srv/attrs/xattr", "trusted.note") == b"\x00\xffbinary"
    assert xattr("srv/attrs/xattr", "user.note") == b"podman's"
    acl = os.getxattr(attrs / "acl", "system.posix_acl_access")
    assert xattr("srv/attrs/acl", "system.posix_acl_access") == acl
    default = os.getxattr(attrs / "acl-dir", "system.posix_acl_default")
    assert xattr("srv/attrs/acl-dir", "system.posix_acl_default") == default
    assert not found["srv/attrs/suid-link"].pax_headers
    assert not found["srv/attrs/gone"].pax_headers
    with tarfile.open(fileobj=io.BytesIO(once)) as tar:
        gone = tar.extractfile("srv/attrs/gone")
        assert gone is not None and gone.read() == b"removed since the export"
    assert again == once
    assert rewritten(tmp_path, once, name="stored") == once  # the restore's check changes nothing


def test_attributes_are_never_read_through_a_symlink_of_the_container(tmp_path: Path) -> None:
    """The container is the untrusted side: a folder it swapped for a symlink to a host
    folder, or a symlink as the last name, gives no attributes of the host's files."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("s")
    os.setxattr(host / "secret", "trusted.host", b"host's")
    root = tmp_path / "merged"
    root.mkdir()
    (root / "srv").symlink_to(host)
    (root / "last").symlink_to(host / "secret")
    diff = diff_of([(entry("srv/secret"), b"s"), (entry("last", tarfile.SYMTYPE, "x"), b"")])
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = members(rewritten(tmp_path, diff, podman_rootfs.FromContainer(fd)))
    finally:
        os.close(fd)
    assert not found["srv/secret"].pax_headers and not found["last"].pax_headers


BIG = b"v" * (podman_rootfs.XATTR_SIZE_MAX + 1)
HOSTILE = [
    ([(entry("../escape"), b"x")], "../escape", "'..'"),
    ([(entry("srv/x", tarfile.LNKTYPE, "/etc/passwd"), b"")], "srv/x", "hard link"),
    ([(entry("srv/x", tarfile.LNKTYPE, "../../etc/passwd"), b"")], "srv/x", "'..'"),
    (
        [
            (entry("srv/s", tarfile.SYMTYPE, "/etc/passwd"), b""),
            (entry("srv/x", tarfile.LNKTYPE, "srv/s"), b""),
        ],
        "srv/x",
        "hard link",
    ),
    (
        [(entry("srv/d", tarfile.SYMTYPE, "/etc"), b""), (entry("srv/d/shadow"), b"owned")],
        "srv/d/shadow",
        "below 'srv/d', a symlink",
    ),
    ([(entry("a/" * 2100 + "x"), b"x")], "a/a/a", "PATH_MAX"),
    ([(entry("srv/x", security__selinux=b"unconfined_u"), b"x")], "srv/x", "security.selinux"),
    ([(entry("srv/x", trusted__overlay__opaque=b"y"), b"x")], "srv/x", "trusted.overlay.opaque"),
    ([(entry("srv/x", system__posix_acl_access=b"junk"), b"x")], "srv/x", "not an ACL"),
    ([(entry("srv/x", system__posix_acl_default=ACL), b"x")], "srv/x", "default ACL"),
    ([(entry("srv/x", user__big=BIG), b"x")], "srv/x", "over 65536 bytes"),
    ([(entry("srv/x", tarfile.CONTTYPE), b"")], "srv/x", "type"),
]


@pytest.mark.parametrize("hostile,named,why", HOSTILE)
def test_a_hostile_stored_diff_is_refused_naming_the_member(
    tmp_path: Path, hostile: list[tuple[tarfile.TarInfo, bytes]], named: str, why: str
) -> None:
    """Refused before Podman sees it: a damaged checkpoint (the one before is tried)."""
    with pytest.raises(ContainerError) as refused:
        rewritten(tmp_path, diff_of(hostile))
    assert refused.value.category == "corrupt-image"
    assert named in str(refused.value) and why in str(refused.value), str(refused.value)


def test_nothing_lands_below_a_symlink_of_the_base_image(tmp_path: Path) -> None:
    """Tried with Podman 4.3: its import wrote a diff's member `var/run/x` to the host's
    /run/x, through the image's /var/run -> /run, and removed what deleted.files names the
    same way. Both are refused; a member below a real folder of the image, or below a
    folder the diff makes over such a symlink, is not."""
    base = tmp_path / "image"
    (base / "srv").mkdir(parents=True)
    (base / "var").mkdir()
    (base / "var/run").symlink_to("/run")
    (base / "etc").symlink_to("/etc")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("var/run/owned", "etc/shadow"):
            with pytest.raises(ContainerError, match="symlink or file of the base image"):
                rewritten(
                    tmp_path,
                    diff_of([(entry(name), b"x")]),
                    beneath=podman_rootfs.Beneath(lambda: fd),
                )
        fine = diff_of(
            [(entry("srv/x"), b"x"), (entry("etc", tarfile.DIRTYPE), b""), (entry("etc/y"), b"y")]
        )
        beneath = podman_rootfs.Beneath(lambda: fd)
        assert members(rewritten(tmp_path, fine, beneath=beneath)).keys() == {
            "srv/x",
            "etc",
            "etc/y",
        }
        podman_rootfs.check_deleted('["srv/gone", "etc/old", "new/dir"]', beneath)
        for deleted in ('["var/run/sshd.pid"]', '["../../etc"]', '["/"]', '{"a": 1}', "[1]"):
            with pytest.raises(podman_rootfs.UnsafeArchive):
                podman_rootfs.check_deleted(deleted, beneath)
    finally:
        os.close(fd)


def test_the_base_image_is_looked_at_only_when_a_name_needs_it(tmp_path: Path) -> None:
    """Mounting the image costs 0.2 s a restore: a diff whose members all lie below its own
    folders (Podman's `etc/hosts` changes) does without."""
    calls: list[int] = []

    def base() -> int:
        calls.append(1)
        return -1

    own = diff_of([(entry("etc", tarfile.DIRTYPE), b""), (entry("etc/hosts"), b"h")])
    rewritten(tmp_path, own, beneath=podman_rootfs.Beneath(base))
    assert calls == []
    rewritten(tmp_path, diff_of([(entry("srv/x"), b"x")]), beneath=podman_rootfs.Beneath(base))
    assert calls == [1]


def test_a_restore_hands_podman_only_checked_tars(tmp_path: Path) -> None:
    """The import tar is not written (the dead container is not removed) when a stored tar
    or deleted.files is refused; good ones go into the import as checked, nothing left
    behind."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"p" * 4096)
    diff = images / "podman.rootfs-diff.tar"
    shm = images / "podman.devshm-checkpoint.tar"
    export = tmp_path / "import.tar"
    hostile = diff_of([(entry("d", tarfile.SYMTYPE, "/etc"), b""), (entry("d/passwd"), b"")])
    for tar in (diff, shm):
        tar.write_bytes(hostile)
        with pytest.raises(ContainerError, match="d/passwd"):
            podman_export.pack(images, export)
        assert sorted(os.listdir(tmp_path)) == ["images"]
        tar.write_bytes(diff_of([(entry("srv/x", system__posix_acl_access=ACL), b"x")]))
    (images / "podman.deleted.files").write_text('["srv/../../x"]')
    with pytest.raises(ContainerError, match=r"deleted\.files"):
        podman_export.pack(images, export)
    (images / "podman.deleted.files").write_text('["srv/y"]')
    podman_export.pack(images, export)
    with tarfile.open(export) as tar:
        for name in ("rootfs-diff.tar", "devshm-checkpoint.tar"):
            inner = tar.extractfile(name)
            assert inner is not None
            found = members(inner.read())["srv/x"]
            assert found.pax_headers["SCHILY.xattr.system.posix_acl_access"]
    assert sorted(os.listdir(tmp_path)) == ["images", "import.tar"]
