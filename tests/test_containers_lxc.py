"""LXC containers as workloads: checkpointed on schedule, restored by the daemon when killed,
rolled back, refused with the line to change when their config cannot be checkpointed, and
restored on another host that has only the bucket."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from pathlib import Path

import pytest

from checkpointer import containers
from checkpointer.criu import DumpOptions
from tests.support import Daemon, Network, s3_config
from tests.support.containers import (
    LXC_PATH,
    ask,
    lxc_container,
    lxc_pid,
    make_lxc,
    plant_attributes,
    remove_lxc,
    restored_since,
    rsync_differences,
    setuid_init,
    start_lxc,
)


def checkpoint_after(d: Daemon, name: str, since: float, timeout: float = 60.0) -> str:
    """The id of a scheduled checkpoint of NAME whose dump began after `since` (a wall time):
    the second one to complete after it (the first may have been dumping already)."""
    first = d.wait_for(name, lambda s: (s["last_checkpoint_age_seconds"] is not None
                                        and time.time() - s["last_checkpoint_age_seconds"] > since),
                       timeout)["last_checkpoint"]  # fmt: skip
    st = d.wait_for(name, lambda s: s["last_checkpoint"] != first, timeout)
    return str(st["last_checkpoint"])


def test_lxc_container_on_schedule_restored_after_lxc_stop_and_rolled_back(
    daemon: Daemon,
) -> None:
    name, port = f"ckt-lxc-{os.getpid()}", 8080
    with lxc_container(name, port):
        daemon.cli("register", "web", "--lxc", name, "--every", "2s")
        st = daemon.status("web")
        assert st["kind"] == "lxc" and st["container"] == name and st["pid"] == lxc_pid(name)
        assert [ask(st["pid"], port) for _ in range(3)] == ["1", "2", "3"]
        older = checkpoint_after(daemon, "web", time.time())
        again = daemon.cli("register", "web2", "--lxc", name, check=False)
        assert again.returncode == 1 and "already registered as web" in again.stderr, again.stderr
        assert ask(st["pid"], port) == "4" and ask(st["pid"], port) == "5"
        newer = checkpoint_after(daemon, "web", time.time())
        killed = time.monotonic()
        subprocess.run(["lxc-stop", "-k", "-n", name], check=True, capture_output=True)
        # The new PID shows before the restore is recorded: wait for the record too.
        st = daemon.wait_for("web", lambda s: restored_since(s, st), timeout=30)
        assert time.monotonic() - killed < 15
        assert st["restores"][-1]["reason"] == "crash", st["restores"]
        assert st["restores"][-1]["checkpoint"] >= newer  # ids sort by time: newer or later
        assert ask(lxc_pid(name), port) == "6"  # the count at the checkpoint, + 1
        daemon.cli("rollback", "web", "--to", older)
        assert ask(lxc_pid(name), port) == "4"  # the older checkpoint's count, + 1


def test_lxc_rootfs_comes_back_attribute_for_attribute_after_a_crash(
    daemon: Daemon, workdir: Path
) -> None:
    """Init a setuid binary with a second hard-linked name (the busybox whose restore failed
    with `bad mode`), plus a file capability, xattrs, ACLs, a device node and a FIFO: killed,
    restored by the daemon, and the restored rootfs is what `rsync -aHAX` calls the same."""
    name, port = f"ckt-lxcattr-{os.getpid()}", 8080
    remove_lxc(name)
    try:
        folder = make_lxc(name, port)
        plant_attributes(folder / "rootfs")
        with open(folder / "config", "a") as config:
            config.write(setuid_init(folder / "rootfs", port))
        start_lxc(name)
        assert os.readlink(f"/proc/{lxc_pid(name)}/exe").endswith("/srv/attrs/python-again")
        daemon.cli("register", "web", "--lxc", name, "--every", "1h")
        st = daemon.status("web")
        assert [ask(st["pid"], port) for _ in range(2)][-1] == "2"
        daemon.checkpoint("web")
        reference = workdir / "reference"
        subprocess.run(["rsync", "-aHAX", f"{folder}/rootfs/", f"{reference}/"], check=True)
        subprocess.run(["lxc-stop", "-k", "-n", name], check=True, capture_output=True)
        st = daemon.wait_for("web", lambda s: restored_since(s, st), timeout=60)
        assert st["restores"][-1]["result"] == "ok", st["restores"]
        assert ask(lxc_pid(name), port) == "3"
        assert rsync_differences(reference, folder / "rootfs") == []
    finally:
        remove_lxc(name)


def test_lxc_config_that_cannot_be_checkpointed_is_refused_naming_the_line(
    daemon: Daemon, workdir: Path
) -> None:
    name, port = f"ckt-lxctty-{os.getpid()}", 8080
    with lxc_container(name, port, extra="lxc.tty.max = 5\n") as folder:
        r = daemon.cli("register", "web", "--lxc", name, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{folder}/config:9: `lxc.tty.max = 5`" in r.stderr, r.stderr
        assert "set `lxc.tty.max = 0`" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert ask(lxc_pid(name), port) == "1"  # it keeps running, untouched
        assert daemon.json("status") == []
        # Had it been registered: lxc-checkpoint's own failure is one line with the fix, the
        # full output kept, and the container still runs.
        images = workdir / "images"
        images.mkdir()
        lxc = containers.runtimes(workdir / "failed")["lxc"]
        with pytest.raises(containers.ContainerError) as e:
            lxc.checkpoint(name, images, DumpOptions())
        assert e.value.category == "tty" and "set `lxc.tty.max = 0`" in str(e.value)
        assert e.value.log is not None and "Unable to find a master" in e.value.log.read_text()
        assert ask(lxc_pid(name), port) == "2"


def test_lxc_container_restores_on_another_host_from_the_bucket(workdir: Path) -> None:
    name, port = f"ckt-lxcmig-{os.getpid()}", 8080
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-lxc-{os.getpid()}")
        a = net.add_host("a", s3_config(net.moto, bucket))
        b = net.add_host("b", s3_config(net.moto, bucket), key_file=a.key_file)
        for host in (a, b):  # each host its own container folder: B's starts empty
            host._must(
                [*host.prefix, "mount", "-t", "tmpfs", "-o", "mode=0700", "lxc", str(LXC_PATH)]
            )
        try:
            folder = make_lxc(name, port, run=a.prefix)
            rootfs = a.view(folder / "rootfs")
            plant_attributes(rootfs)  # and its setuid init: a restore keeps every attribute
            with open(a.view(folder / "config"), "a") as config:
                config.write(setuid_init(rootfs, port))
            start_lxc(name, run=a.prefix)
            a.start()
            a.cli("register", "web", "--lxc", name, "--every", "1h", "--no-auto-restore")
            pid = a.pid("web")
            assert [ask(pid, port) for _ in range(4)][-1] == "4"
            a.checkpoint("web")
            reference = workdir / "reference"
            subprocess.run(["rsync", "-aHAX", f"{rootfs}/", f"{reference}/"], check=True)
            remove_lxc(name, run=a.prefix)  # host A is gone, container and all
            a.stop()
            assert not b.view(LXC_PATH / name).exists()
            b.start()
            r = b.json("restore", "web")
            assert r["source"] == "repository"
            assert b.view(LXC_PATH / name / "config").is_file()
            assert ask(lxc_pid(name, run=b.prefix), port) == "5"
            st = b.status("web")
            assert st["kind"] == "lxc" and st["state"] == "running"
            assert rsync_differences(reference, folder / "rootfs", run=b.prefix) == []
        finally:
            for host in (a, b):
                if host.anchor is not None:
                    remove_lxc(name, run=host.prefix)


def test_lxc_container_declared_in_the_config_comes_back_after_a_reboot(workdir: Path) -> None:
    """Declared in the config, checkpointed, then the host "reboots": the daemon stops, the
    container dies, the kept image in /dev/shm is gone and the boot id changes. The daemon
    started again restores the container from the repository with its count."""
    name, port = f"ckt-lxcboot-{os.getpid()}", 8080
    boot_id = workdir / "boot_id"
    boot_id.write_text("boot-1\n")
    d = Daemon(workdir, f"workloads:\n  - name: web\n    lxc: {name}\n    every: 1h\n")
    d.env = {"CHECKPOINTER_BOOT_ID_FILE": str(boot_id)}
    with lxc_container(name, port):
        try:
            d.start()
            pid = d.pid("web")
            assert [ask(pid, port) for _ in range(3)][-1] == "3"
            d.checkpoint("web")
            d.terminate()
            subprocess.run(["lxc-stop", "-k", "-n", name], check=True, capture_output=True)
            d.drop_kept_images()
            boot_id.write_text("boot-2\n")
            d.start()
            st = d.wait_for("web", lambda s: s["state"] == "running" and s["restores"])
            assert st["restores"][-1]["reason"] == "boot", st["restores"]
            assert ask(lxc_pid(name), port) == "4"
            assert st["restores"][-1]["detail"].endswith("from the repository"), st["restores"]
        finally:
            d.stop()


def test_lxc_container_migrates_to_another_host_of_the_fleet(workdir: Path) -> None:
    """`migrate` moves a container: the final checkpoint stops it on A, B (its own, empty,
    /var/lib/lxc) recreates it from the bucket and it answers with its count."""
    from tests.test_fleet import fleet

    name, port = f"ckt-lxcfleet-{os.getpid()}", 8080
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-lxcf-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        b = fleet(net, bucket, "b", False, a.key_file)
        for host in (a, b):
            host._must(
                [*host.prefix, "mount", "-t", "tmpfs", "-o", "mode=0700", "lxc", str(LXC_PATH)]
            )
        try:
            make_lxc(name, port, run=a.prefix)
            start_lxc(name, run=a.prefix)
            a.start()
            b.start()
            a.cli("register", "web", "--lxc", name, "--every", "1h")
            old = a.pid("web")
            assert [ask(old, port) for _ in range(5)][-1] == "5"
            r = a.json("migrate", "web", "--to", "b")
            assert r["to"] == "b"
            st = b.wait_for("web", lambda s: s["state"] == "running", timeout=60)
            assert st["kind"] == "lxc" and st["restores"][-1]["reason"] == "migration"
            assert ask(lxc_pid(name, run=b.prefix), port) == "6"
            assert a.status("web")["state"] == "elsewhere"
            assert not os.path.exists(f"/proc/{old}")  # stopped on A
        finally:
            for host in (a, b):
                if host.anchor is not None:
                    remove_lxc(name, run=host.prefix)


# Appends its count to /srv/count every 10 ms (opened and closed each time, so CRIU checks no
# size): the file holds 1, 2, 3... and the process holds the last number in memory.
APPENDER = """import time
n = 0
while True:
    n += 1
    with open("/srv/count", "a") as f:
        f.write(f"{n}\\n")
    time.sleep(0.01)
"""


def test_a_migrating_lxc_container_loses_and_repeats_no_write(workdir: Path) -> None:
    """The final checkpoint's rootfs archive is from the dump's moment: a container appending
    a count every 10 ms goes on, on B, from the very number its file ends with (not frozen
    until the rootfs was archived, it appended for ~1 s more on A: those numbers came twice)."""
    from tests.test_fleet import fleet, until

    name = f"ckt-lxcfrz-{os.getpid()}"
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-lxcz-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        b = fleet(net, bucket, "b", False, a.key_file)
        for host in (a, b):
            host._must(
                [*host.prefix, "mount", "-t", "tmpfs", "-o", "mode=0700", "lxc", str(LXC_PATH)]
            )
        try:
            folder = make_lxc(name, 8080, run=a.prefix)
            (a.view(folder) / "rootfs/srv/appender.py").write_text(APPENDER)
            with open(a.view(folder) / "config", "a") as config:
                config.write("lxc.init.cmd = /usr/bin/python3 /srv/appender.py\n")
            start_lxc(name, run=a.prefix)
            a.start()
            b.start()
            a.cli("register", "web", "--lxc", name, "--every", "1h")
            a.json("migrate", "web", "--to", "b")
            b.wait_for("web", lambda s: s["state"] == "running", timeout=60)
            count = b.view(folder) / "rootfs/srv/count"
            restored = len(count.read_text().split())
            until("B appends", lambda: len(count.read_text().split()) > restored + 20, 20)
            numbers = [int(x) for x in count.read_text().split()]
            assert numbers == list(range(1, len(numbers) + 1)), _first_break(numbers)
        finally:
            for host in (a, b):
                if host.anchor is not None:
                    remove_lxc(name, run=host.prefix)


def _first_break(numbers: list[int]) -> str:
    for i, (x, y) in enumerate(itertools.pairwise(numbers)):
        if y != x + 1:
            return f"after {x} (line {i + 1}) comes {y}, of {len(numbers)} lines"
    return "no break"
