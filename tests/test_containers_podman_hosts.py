"""A Podman container restored on another host from the bucket: that host needs the base
image, and says so when it lacks it; the container's files come back attribute for attribute
(ACLs and `trusted.` xattrs included, which Podman's own export loses)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import Host, Network, s3_config
from tests.support.containers import (
    IMAGE,
    IMAGE_ARCHIVE,
    PODMAN_STORAGE,
    ask,
    plant_attributes,
    require_rootfs,
    rsync_differences,
)
from tests.support.paths import PROGRAMS


def podman_on(host: Host, *args: str) -> str:
    r = host.run("podman", *args)
    assert r.returncode == 0, f"podman {' '.join(args)} on {host.name}: {r.stderr[-1000:]}"
    return r.stdout.strip()


def test_podman_container_restores_on_another_host_once_it_has_the_image(workdir: Path) -> None:
    require_rootfs()
    name, port = f"ckt-podmig-{os.getpid()}", 18080
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-podman-{os.getpid()}")
        a = net.add_host("a", s3_config(net.moto, bucket))
        b = net.add_host("b", s3_config(net.moto, bucket), key_file=a.key_file)
        for host in (a, b):  # each host its own, empty, container storage
            for folder in PODMAN_STORAGE:
                host._must([*host.prefix, "mount", "-t", "tmpfs", "-o", "mode=0700", "ctr", folder])
        try:
            podman_on(a, "load", "-q", "-i", str(IMAGE_ARCHIVE))
            source = (PROGRAMS / "container_counter.py").read_text()
            podman_on(a, "run", "-d", "--name", name, "--runtime", "runc", "--network", "host",
                      "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                      IMAGE, "/usr/bin/python3", "-c", source, str(port), "0")  # fmt: skip
            a.start()
            a.cli("register", "web", "--podman", name, "--every", "1h", "--no-auto-restore")
            assert [ask(a.pid("web"), port) for _ in range(3)][-1] == "3"
            attrs = plant_attributes(Path(f"/proc/{a.pid('web')}/root"))
            reference = workdir / "reference"
            subprocess.run(["rsync", "-aHAX", f"{attrs}/", f"{reference}/"], check=True)
            a.checkpoint("web")
            podman_on(a, "rm", "--force", "--time", "0", name)  # host A is gone
            a.stop()
            b.start()
            r = b.cli("restore", "web", check=False)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"base image {IMAGE} is not on this host" in r.stderr, r.stderr
            assert "podman load" in r.stderr and len(r.stderr.strip().splitlines()) == 1
            podman_on(b, "load", "-q", "-i", str(IMAGE_ARCHIVE))
            b.cli("restore", "web")
            pid = int(podman_on(b, "container", "inspect", "--format", "{{.State.Pid}}", name))
            assert ask(pid, port) == "4"
            merged = Path(podman_on(b, "mount", name))  # in host B's mount namespace
            assert rsync_differences(reference, merged / "srv/attrs", run=b.prefix) == []
            podman_on(b, "umount", name)
            assert b.status("web")["kind"] == "podman"
        finally:
            for host in (a, b):
                if host.anchor is not None:
                    host.run("podman", "rm", "--force", "--time", "0", name)
