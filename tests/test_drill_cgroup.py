"""A restore drill's sandbox in a cgroup of its own (checkpointer/criu/sandbox/cgroup.py):
every process of the sandbox is in it while CRIU runs, under its CPU quota, and it is gone
when the drill ends; a killed daemon's empty one is removed at the next start, another live
daemon's never."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from checkpointer.api import Op
from checkpointer.cli.client import call
from checkpointer.criu.sandbox import cgroup
from tests.support import PROGRAMS, Daemon, free_port, http_get
from tests.test_drills import _pids_of, leftovers

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""


def test_hierarchies_are_read_as_the_kernel_lists_them() -> None:
    found = cgroup.hierarchies(MOUNTINFO)
    assert [(h.mount, "cpu" in h.controllers, h.v2) for h in found] == [
        (Path("/sys/fs/cgroup/cpu,cpuacct"), True, False),
        (Path("/sys/fs/cgroup/cpuset"), False, False),
        (Path("/sys/fs/cgroup/memory"), False, False),
    ]
    own = "4:memory:/x\n3:cpuset:/\n1:cpu,cpuacct:/daemon.service\n0::/\n"
    assert cgroup.own_cgroup(found[0], own) == Path("/sys/fs/cgroup/cpu,cpuacct/daemon.service")
    assert cgroup.own_cgroup(found[1], own) == Path("/sys/fs/cgroup/cpuset")


def sandbox_cgroups(prefix: str) -> list[Path]:
    where = cgroup.cpu_parent()
    return list(where[0].glob(f"{prefix}*")) if where else []


def test_the_sandbox_runs_in_a_cgroup_of_its_own_under_a_cpu_quota_gone_afterwards(
    daemon: Daemon,
) -> None:
    """With `throttle`: every process of the sandbox in the cgroup while CRIU runs, the
    quota set, the cgroup removed when the drill ends."""
    if cgroup.cpu_parent() is None:
        pytest.skip("no cgroup with the cpu controller can be made here")
    d = daemon
    d.stop()
    d.env["CHECKPOINTER_DRILL_PRIORITY"] = "idle,shm,throttle"
    d.start()
    port = free_port()
    ballast = [sys.executable, str(PROGRAMS / "ballast_server.py"), str(port), "200"]
    d.cli("run", "big", "--no-auto-restore", "--", *ballast)
    http_get(port, timeout=60)
    d.checkpoint("big")
    report: dict[str, Any] = {}
    sock = d.state / "checkpointer.sock"
    t = threading.Thread(target=lambda: report.update(call(sock, Op.DRILL, name="big")))
    t.start()
    seen: dict[str, Any] = {}
    assert d.proc is not None
    mine = f"{cgroup.PREFIX}{d.proc.pid}-"  # not another daemon's (tests run side by side)
    try:
        deadline = time.monotonic() + 60
        while not seen and t.is_alive() and time.monotonic() < deadline:
            criu = next(iter(_argv0("criu", "--leave-stopped", "big-drill-")), None)
            init = next(iter(_argv0("python", "criu/sandbox/init.py", "big-drill-")), None)
            groups = sandbox_cgroups(mine)
            members = {pid for f in groups for pid in _members(f)}
            if criu is not None and init is not None and criu in members:
                seen = {
                    "criu": criu,
                    "init": init,
                    "members": members,
                    "groups": groups,
                    "quota": [_quota(f) for f in groups],
                }
            time.sleep(0.005)
    finally:
        t.join()
    assert report["result"] == "verified", report
    assert seen, "the sandbox's CRIU was never seen running"
    assert {seen["criu"], seen["init"]} <= seen["members"], seen
    assert seen["quota"] == [cgroup.QUOTA] * len(seen["groups"]), seen
    assert all(not f.exists() for f in seen["groups"]), seen
    assert sandbox_cgroups(mine) == []
    assert leftovers(d) == []


def _argv0(program: str, *words: str) -> list[int]:
    """Processes that run `program` (its name in the first word of their command line: not
    the unshare before the sandbox's init, nor the init whose request names CRIU's options)
    with every one of `words` in their command line."""
    out = []
    for pid in _pids_of(*words):
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if program.encode() in Path(argv0.decode(errors="replace")).name.encode():
                out.append(pid)
    return out


def _members(folder: Path) -> set[int]:
    try:
        return {int(p) for p in (folder / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def _quota(folder: Path) -> float | None:
    """The cgroup's CPU quota, a share of one CPU (v1 or v2 files)."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text()
            period = (folder / "cpu.cfs_period_us").read_text()
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def test_a_killed_daemons_empty_sandbox_cgroup_goes_another_live_daemons_stays() -> None:
    where = cgroup.cpu_parent()
    if where is None:
        pytest.skip("no cgroup with the cpu controller can be made here")
    gone = where[0] / f"{cgroup.PREFIX}{_dead_pid()}-abcdef"
    live = where[0] / f"{cgroup.PREFIX}{os.getpid()}-abcdef"
    os.mkdir(gone)
    os.mkdir(live)
    try:
        assert gone in cgroup.remove_stale()
        assert not gone.exists() and live.exists()
    finally:
        for f in (gone, live):
            if f.exists():
                os.rmdir(f)


def _dead_pid() -> int:
    pid = 4_000_000  # above any pid_max default: never a live process
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid
