"""LXC and Podman containers for the tests: the counter server as a container's init, in a
Debian rootfs built once by scripts/build-test-rootfs.sh (`make test` runs it).

Each container gets its own network namespace (LXC: an empty one; Podman: the host's, which
in a fleet test is the test host's own); requests reach it through nsenter into the
container's init, so two containers may listen on the same port.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.paths import PROGRAMS, ROOT

CACHE = Path("/var/cache/checkpointer-tests")
ROOTFS = CACHE / "rootfs-v1"
IMAGE = "localhost/checkpointer-test:v1"
IMAGE_ARCHIVE = CACHE / "image-v1.tar"  # `podman load` it where the storage starts empty
PODMAN_STORAGE = ("/var/lib/containers", "/run/containers", "/run/libpod")
LXC_PATH = Path("/var/lib/lxc")
COUNTER = "/srv/counter.py"

_GET = r"""
import socket, sys, time
port, path, deadline = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print(data.decode().split("\r\n\r\n", 1)[1].strip())
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""


def require_rootfs() -> None:
    """Build the rootfs (and Podman's image) if `make test` has not: about 40 s, once."""
    subprocess.run(["bash", str(ROOT / "scripts" / "build-test-rootfs.sh")], check=True)


def ask(pid: int, port: int, path: str = "/", timeout: float = 10.0) -> str:
    """GET PATH from the counter in the container whose init is PID (inside its network)."""
    r = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", _GET, str(port), path,
         str(timeout)],
        capture_output=True, text=True, timeout=timeout + 10,
    )  # fmt: skip
    if r.returncode != 0:
        raise AssertionError(f"container (pid {pid}) did not answer: {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


LXC_CONFIG = """\
lxc.uts.name = {name}
lxc.rootfs.path = dir:{rootfs}
lxc.net.0.type = empty
lxc.tty.max = 0
lxc.pty.max = 1
lxc.mount.auto = proc:mixed sys:mixed
lxc.autodev = 1
lxc.init.cmd = /usr/bin/python3 {counter} {port} {mb}
"""


def make_lxc(
    name: str,
    port: int,
    mb: int = 0,
    lxc_path: Path = LXC_PATH,
    extra: str = "",
    run: list[str] | None = None,
) -> Path:
    """Create LXC container NAME (config + a copy of the rootfs with the counter in /srv).
    `run` is put before the commands (nsenter into a test host's mount namespace)."""
    require_rootfs()
    prefix = run or []
    folder = lxc_path / name
    rootfs = folder / "rootfs"
    subprocess.run([*prefix, "mkdir", "-p", "-m", "0700", str(folder)], check=True)
    subprocess.run([*prefix, "cp", "-a", f"{ROOTFS}/.", str(rootfs)], check=True)
    subprocess.run(
        [*prefix, "cp", str(PROGRAMS / "container_counter.py"), f"{rootfs}{COUNTER}"], check=True
    )
    config = LXC_CONFIG.format(name=name, rootfs=rootfs, counter=COUNTER, port=port, mb=mb) + extra
    subprocess.run(
        [*prefix, "tee", str(folder / "config")],
        input=config,
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return folder


def start_lxc(name: str, run: list[str] | None = None) -> None:
    subprocess.run(
        [*(run or []), "lxc-start", "-n", name, "-d"],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def lxc_pid(name: str, run: list[str] | None = None, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(
            [*(run or []), "lxc-info", "-n", name, "-p", "-H"], capture_output=True, text=True
        )
        if r.stdout.strip().isdigit():
            return int(r.stdout.strip())
        assert time.monotonic() < deadline, f"LXC container {name} is not running"
        time.sleep(0.05)


def remove_lxc(name: str, lxc_path: Path = LXC_PATH, run: list[str] | None = None) -> None:
    prefix = run or []
    subprocess.run([*prefix, "lxc-stop", "-k", "-n", name], capture_output=True)
    subprocess.run([*prefix, "rm", "-rf", str(lxc_path / name)], capture_output=True)


@contextlib.contextmanager
def lxc_container(name: str, port: int, mb: int = 0, extra: str = "") -> Iterator[Path]:
    """A running LXC container NAME serving the counter on PORT; removed afterwards."""
    remove_lxc(name)
    try:
        folder = make_lxc(name, port, mb, extra=extra)
        start_lxc(name)
        yield folder
    finally:
        remove_lxc(name)


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL
    )


def podman_pid(name: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        r = podman("container", "inspect", "--format", "{{.State.Pid}}", name, check=False)
        if r.returncode == 0 and r.stdout.strip().isdigit() and int(r.stdout.strip()) > 0:
            return int(r.stdout.strip())
        assert time.monotonic() < deadline, f"Podman container {name} is not running"
        time.sleep(0.05)


@contextlib.contextmanager
def podman_container(name: str, port: int, mb: int = 0, runtime: str = "runc") -> Iterator[str]:
    """A running Podman container NAME (image IMAGE, host network) serving the counter on
    PORT; removed afterwards. The program is passed as `python3 -c`: nothing to mount."""
    require_rootfs()
    podman("rm", "--force", "--time", "0", name, check=False)
    source = (PROGRAMS / "container_counter.py").read_text()
    try:
        podman(
            "run", "-d", "--name", name, "--runtime", runtime, "--network", "host",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
            IMAGE, "/usr/bin/python3", "-c", source, str(port), str(mb),
        )  # fmt: skip
        yield name
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def restored_since(now: dict[str, Any], before: dict[str, Any]) -> bool:
    """A status `now` whose container runs again under a new PID after a restore recorded
    since status `before`. The new PID is visible before the restore's record is written."""
    return (
        now["state"] == "running"
        and now["pid"] != before["pid"]
        and len(now["restores"]) > len(before["restores"])
    )


def plant_attributes(root: Path, prefix: str = "srv/attrs") -> Path:
    """Under ROOT/PREFIX, one of every kind of file attribute a rootfs must keep: a setuid and
    setgid binary with a second (hard-linked) name, a file capability, `user.` and `trusted.`
    extended attributes, an ACL and a default ACL, a sticky folder, a device node, a FIFO, a
    symlink, and times to the nanosecond. Returns the folder."""
    folder = root / prefix
    folder.mkdir(parents=True)
    (folder / "suid").write_bytes(Path("/bin/true").read_bytes())
    (folder / "suid").chmod(0o6755)
    os.link(folder / "suid", folder / "suid-link")
    (folder / "cap").write_bytes(b"#!/bin/sh\n")
    subprocess.run(["setcap", "cap_net_raw+ep", str(folder / "cap")], check=True)
    (folder / "xattr").write_text("x\n")
    os.setxattr(folder / "xattr", "user.note", b"kept")
    os.setxattr(folder / "xattr", "trusted.note", b"\x00\xffbinary")
    (folder / "acl").write_text("a\n")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:55:r", str(folder / "acl")], check=True)
    (folder / "acl-dir").mkdir()
    subprocess.run(["setfacl", "-d", "-m", "g:55:rx", str(folder / "acl-dir")], check=True)
    (folder / "sticky").mkdir(mode=0o1777)
    (folder / "sticky").chmod(0o1777)
    os.mknod(folder / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(folder / "fifo")
    os.chown(folder / "fifo", 1234, 55)
    (folder / "link").symlink_to("suid")
    os.utime(folder / "xattr", ns=(1, 1_000_000_123))
    return folder


def rsync_differences(original: Path, restored: Path, run: list[str] | None = None) -> list[str]:
    """What `rsync -aHAX` would change to make RESTORED like ORIGINAL (content, modes,
    owners, hard links, ACLs, xattrs, times, nodes): an independent judge of a restored rootfs.
    Empty when they are the same. `run`: a test host's prefix, to see RESTORED as it does."""
    r = subprocess.run(
        [*(run or []), "rsync", "-aHAXn", "--numeric-ids", "--itemize-changes", "--delete",
         f"{original}/", f"{restored}/"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, f"rsync could not compare them: {r.stderr.strip()[-1000:]}"
    return r.stdout.splitlines()


def setuid_init(rootfs: Path, port: int) -> str:
    """The counter's python as a setuid and setgid binary with a second, hard-linked name,
    planted in ROOTFS (plant_attributes' folder): the config line that makes it the
    container's init. CRIU checks the mode of a running executable on restore (`File ... has
    bad mode`), so it fails if the restored rootfs lost the bits on either name."""
    folder = rootfs / "srv/attrs"
    link = rootfs / "usr/bin/python3"  # -> python3.11; not resolve(): ROOTFS may be /proc/N/root/..
    python = rootfs / "usr/bin" / os.readlink(link) if link.is_symlink() else link
    (folder / "python").write_bytes(python.read_bytes())
    (folder / "python").chmod(0o6755)
    os.link(folder / "python", folder / "python-again")
    return f"lxc.init.cmd = /srv/attrs/python-again {COUNTER} {port} 0\n"
