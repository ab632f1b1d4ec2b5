"""Podman.freeze / thaw through the container's cgroup: a frozen container is checkpointed
as it is and stays frozen; thawed, it runs on (a migration whose hand-over failed). Never a
cgroup that is not the container's own."""

from __future__ import annotations

import os
import time
from pathlib import Path

from checkpointer.containers import cgroup_freezer
from checkpointer.containers.base import Tool
from checkpointer.containers.podman import Podman
from checkpointer.criu import DumpOptions
from tests.support.containers import IMAGE, podman, podman_pid, require_rootfs
from tests.test_containers_lxc import APPENDER


def lines(pid: int) -> int:
    try:
        return len(Path(f"/proc/{pid}/root/srv/count").read_text().split())
    except FileNotFoundError:  # not written yet
        return 0


def until_more_than(pid: int, n: int) -> None:
    """Until the appender wrote more than N lines: it runs."""
    deadline = time.monotonic() + 10
    while lines(pid) <= n:
        assert time.monotonic() < deadline, f"the container wrote {lines(pid)} lines, not > {n}"
        time.sleep(0.02)


def test_a_frozen_podman_container_is_checkpointed_frozen_and_runs_on_when_thawed(
    tmp_path: Path,
) -> None:
    require_rootfs()
    name = f"ckt-podfz-{os.getpid()}"
    runtime = Podman(Tool(tmp_path / "failed"))
    podman("rm", "--force", "--time", "0", name, check=False)
    try:
        podman("run", "-d", "--name", name, "--runtime", "runc", "--network", "host",
               "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
               IMAGE, "/usr/bin/python3", "-c", APPENDER)  # fmt: skip
        pid = podman_pid(name)
        until_more_than(pid, 0)
        assert runtime.freeze(name)
        frozen = lines(pid)
        images = tmp_path / "images"
        images.mkdir()
        runtime.checkpoint(name, images, DumpOptions())  # runc dumps it frozen...
        time.sleep(0.3)
        assert lines(pid) == frozen  # ... and leaves it frozen
        assert (images / "pages-1.img").is_file()
        runtime.thaw(name)
        until_more_than(pid, frozen + 5)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_only_a_cgroup_named_for_the_container_and_not_holding_this_service_is_frozen() -> None:
    me = os.getpid()
    assert cgroup_freezer.own_cgroup(me, "no-such-container-id") is not None
    assert cgroup_freezer.own_cgroup(me, "") is not None  # "" is in every name: ours, refused
    gone = 2**22 + 1  # above any pid_max
    assert cgroup_freezer.own_cgroup(gone, "x") == f"cannot read the cgroups of PID {gone}"
