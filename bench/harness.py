"""What every part of the benchmark uses: its folders, launching and killing process trees as
the daemon would, timings and sizes, the figures recorded, and the checkpointer worker."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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


class BenchDaemon:
    """The checkpointer daemon on a private state folder (local repository, encrypted as by
    default), driven through the real CLI as a user would; `extra` is added to its config."""

    def __init__(self, work: Path, extra: str = "", **env: str) -> None:
        self.work = work
        self.state = work / "state"
        self.config = work / "config.yaml"
        self.config.write_text(
            f"state_dir: {self.state}\nmetrics: {{enabled: false}}\n"
            f"storage:\n  key_file: {self.state / 'repository.key'}\n{extra}"
        )
        self.env = clean_env(**env)
        self.log_path = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchDaemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "daemon", "--config", str(self.config), "--stop-workloads-on-exit"],
                stdout=log, stderr=log, cwd=ROOT, env=self.env,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while subprocess.run([*CLI, "status", "--config", str(self.config)],
                             capture_output=True, env=self.env).returncode != 0:  # fmt: skip
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{self.log_path.read_text()}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        from checkpointer.engine import tmpfs_scratch_root

        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=120)
        shutil.rmtree(tmpfs_scratch_root(self.state), ignore_errors=True)

    def call(self, *args: str) -> dict[str, Any]:
        """`checkpointer ARGS --json`, its output."""
        cmd = [*CLI, args[0], "--config", str(self.config), "--json", *args[1:]]
        return run_json(cmd, f"checkpointer {' '.join(args)}", self.env)

    def pid(self, name: str) -> int:
        out = subprocess.run([*CLI, "status", name, "--config", str(self.config), "--json"],
                             capture_output=True, text=True, env=self.env, check=True)  # fmt: skip
        return int(json.loads(out.stdout)[0]["pid"])

    def drop_images(self, disk: bool = True) -> None:
        """As a reboot would: the kept image in tmpfs, and (`disk`) the disk images too."""
        from checkpointer.engine import tmpfs_scratch_root

        shutil.rmtree(tmpfs_scratch_root(self.state) / "hot", ignore_errors=True)
        if disk:
            shutil.rmtree(self.state / "images", ignore_errors=True)

    def peak_rss_mb(self) -> float:
        """The daemon's peak resident memory so far (VmHWM), in MB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in the daemon's status")


def bench_args(
    doc: str | None,
    mb: int,
    rounds: int,
    out: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """--mb, --rounds and --out (default bench/results/OUT) of a benchmark module, and what
    `extra` adds."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--mb", type=int, default=mb)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / out)
    if extra is not None:
        extra(parser)
    return parser.parse_args()
