"""What every part of the benchmark uses: its folders, launching and killing process trees as
the daemon would, timings and sizes, the figures recorded, and the checkpointer worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkpointer.criu import Criu, DumpOptions
from checkpointer.workloads import process

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LAUNCHER = ROOT / "checkpointer" / "workloads" / "launch.py"
SHM = Path("/dev/shm/ckpt-bench")
DISK = Path("/var/tmp/ckpt-bench")
CLI = [PY, "-m", "checkpointer.cli"]

Figures = dict[str, dict[str, list[float]]]


class Recorder:
    """The raw figures of one workload: method → key → every value measured, in the order
    first recorded (which is the order of the table's rows)."""

    def __init__(self) -> None:
        self.figures: Figures = {}

    def __call__(self, method: str, key: str, value: float) -> None:
        self.figures.setdefault(method, {}).setdefault(key, []).append(value)

    def extend(self, figures: Figures) -> None:
        for method, keys in figures.items():
            for key, values in keys.items():
                self.figures.setdefault(method, {}).setdefault(key, []).extend(values)


def launch(cmd: list[str]) -> int:
    """Start `cmd` as a managed workload would be: PID 1 of its own namespace and session."""
    r, w = os.pipe()
    subprocess.run(
        [PY, "-I", str(LAUNCHER), str(w), *cmd],
        pass_fds=(w,),
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    report = os.read(r, 100).decode()
    os.close(r)
    return int(report.split()[1])


def kill(pid: int) -> None:
    """SIGKILL the tree and reap it: its processes are our children (we are a subreaper)."""
    pids = [pid, *process.descendants(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(process.state(p) for p in pids) and time.monotonic() < deadline:
        reap()
        time.sleep(0.01)


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def raw_dump(criu: Criu, pid: int, where: Path) -> tuple[float, float, Path]:
    """A plain CRIU dump of the tree into a new folder under `where`: (frozen, wall, folder)."""
    images = where / f"raw-{time.time_ns()}"
    images.mkdir(parents=True)
    wall, stats = timed(lambda: criu.dump(pid, images, DumpOptions(), "bench"))
    return stats.frozen_time, wall, images


def run_json(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one of our programs; what it printed as JSON (all of it, or its last line)."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed: {r.stderr.strip()[-2000:]}")
    text = r.stdout.strip()
    if not text:
        return {}
    try:
        return dict(json.loads(text))
    except json.JSONDecodeError:
        return dict(json.loads(text.splitlines()[-1]))


# An access key in the environment (or a systemd credential) would win over the key_file
# the benchmark configures.
KEY_ENV = (
    "CHECKPOINTER_REPOSITORY_KEY",
    "CHECKPOINTER_REPOSITORY_PASSPHRASE",
    "CREDENTIALS_DIRECTORY",
)


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any repository key in it (and with `extra`)."""
    return {**{k: v for k, v in os.environ.items() if k not in KEY_ENV}, **extra}


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """One checkpointer checkpoint or restore in a process of its own (bench/worker.py)."""
    cmd = [PY, str(ROOT / "bench" / "worker.py"), json.dumps(args)]
    return run_json(cmd, "worker", clean_env())
