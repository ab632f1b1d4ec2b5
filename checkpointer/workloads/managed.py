"""Start a managed workload: root of its own PID namespace and session, output to its FIFO."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from checkpointer.errors import LaunchFailed
from checkpointer.host import children
from checkpointer.workloads.logs import open_for_workload

_LAUNCHER = Path(__file__).with_name("launch.py")

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
"""A managed workload's whole environment, before its own `env`. Nothing comes from the
daemon's environment: it may hold credentials (AWS_* for the repository), and a workload's
environment is readable in /proc/PID/environ and is saved in every checkpoint image. HOME is
root's because workloads run as root, and many programs expect a HOME."""


def workload_env(env: dict[str, str]) -> dict[str, str]:
    """The environment a managed workload starts with: BASE_ENV, then its own `env` on top."""
    return {**BASE_ENV, **env}


def launch(name: str, command: list[str], cwd: Path | None, env: dict[str, str], fifo: Path) -> int:
    """Start `command`; return the host PID of the tree's root (PID 1 of its namespace)."""
    if cwd is not None and not cwd.is_dir():
        raise LaunchFailed(f"workload {name}: working directory {cwd} does not exist")
    out_fd = open_for_workload(fifo)
    status_r, status_w = os.pipe()
    try:
        proc = children.run(
            [sys.executable, "-I", str(_LAUNCHER), str(status_w), *command],
            timeout=30,
            stdin=subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            pass_fds=(status_w,),
            cwd=cwd,
            env=workload_env(env),
            start_new_session=True,
        )
        os.close(status_w)
        status_w = -1
        report = b""
        while chunk := os.read(status_r, 4096):
            report += chunk
    finally:
        os.close(out_fd)
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
    text = report.decode(errors="replace")
    if proc.returncode != 0 or not text.startswith("ok "):
        reason = text.removeprefix("error ").strip() or f"launcher exited {proc.returncode}"
        raise LaunchFailed(f"workload {name}: {reason}; check `command` (is it on PATH?)")
    return int(text.split()[1])
