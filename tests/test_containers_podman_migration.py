"""A Podman container migrated between two hosts of a fleet is frozen (its cgroup) from
before its final dump until it is killed: what it writes after the dump is not lost, nor
written twice, on the target."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import Host, Network
from tests.support.containers import IMAGE, IMAGE_ARCHIVE, PODMAN_STORAGE, require_rootfs
from tests.test_containers_lxc import APPENDER, _first_break
from tests.test_containers_podman_hosts import podman_on


def podman_hosts(net: Network, bucket: str) -> tuple[Host, Host]:
    """Two fleet hosts, each with its own empty container storage holding the test image."""
    from tests.test_fleet import fleet

    a = fleet(net, bucket, "a", False, None)
    b = fleet(net, bucket, "b", False, a.key_file)
    for host in (a, b):
        for folder in PODMAN_STORAGE:
            host._must([*host.prefix, "mount", "-t", "tmpfs", "-o", "mode=0700", "ctr", folder])
        podman_on(host, "load", "-q", "-i", str(IMAGE_ARCHIVE))
    return a, b


def counts(host: Host, name: str) -> list[int]:
    return [int(x) for x in podman_on(host, "exec", name, "cat", "/srv/count").split()]


def test_a_migrating_podman_container_loses_and_repeats_no_write(workdir: Path) -> None:
    """A container appending a count every 10 ms goes on, on B, from the very number its
    file ends with. Stopped only after its export (SIGSTOP), it appended for the export's
    duration more on A: those numbers came twice on B."""
    from tests.test_fleet import until

    require_rootfs()
    name = f"ckt-podfrz-{os.getpid()}"
    with Network(workdir) as net:
        a, b = podman_hosts(net, net.moto.create_bucket(f"ckpt-podz-{os.getpid()}"))
        try:
            podman_on(a, "run", "-d", "--name", name, "--runtime", "runc", "--network", "host",
                      "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                      IMAGE, "/usr/bin/python3", "-c", APPENDER)  # fmt: skip
            a.start()
            b.start()
            a.cli("register", "web", "--podman", name, "--every", "1h")
            until("A appends", lambda: len(counts(a, name)) > 50, 20)
            a.json("migrate", "web", "--to", "b")
            st = b.wait_for("web", lambda s: s["state"] == "running", timeout=90)
            assert st["kind"] == "podman" and st["restores"][-1]["reason"] == "migration"
            restored = len(counts(b, name))
            until("B appends", lambda: len(counts(b, name)) > restored + 20, 20)
            numbers = counts(b, name)
            assert numbers == list(range(1, len(numbers) + 1)), _first_break(numbers)
            assert a.status("web")["state"] == "elsewhere"
        finally:
            for host in (a, b):
                if host.anchor is not None:
                    host.run("podman", "rm", "--force", "--time", "0", name)
