"""The real daemon, all its modules, threads and caches: its RSS while it checkpoints a
workload (local and S3), and its scheduler with many workloads due at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import CLI, DISK, PY, ROOT, Figures, clean_env, reap, run_json
from bench.workloads import Workload
from checkpointer.engine import tmpfs_scratch_root
from checkpointer.workloads import process
from tests.support.moto_server import Moto

CHECKPOINT_DONE = re.compile(r" checkpointer\.engine[.\w]*: checkpoint \S+ of w\d+: ")


def daemon_checkpoints(
    w: Workload, moto: Moto | None, bucket: str | None, work: Path, rounds: int = 3
) -> Figures:
    """The daemon itself (all its modules, threads and caches) checkpointing the workload:
    its peak RSS, the figure the memory target is about, local (encrypted, as by default, and
    in clear) and S3 (encrypted). Each writes its key file in its own state folder."""
    out: Figures = {}
    setups: list[tuple[str, str]] = [
        ("checkpointer daemon local", ""),
        ("checkpointer daemon local (clear)", "  encryption: false\n"),
    ]
    if moto and bucket:
        setups.append(
            (
                "checkpointer daemon s3",
                "  backend: s3\n  s3:\n"
                f"    bucket: {bucket}\n    prefix: daemon\n    endpoint_url: {moto.url}\n"
                "    region: us-east-1\n    addressing_style: path\n",
            )
        )
    for label, storage in setups:
        state = Path(tempfile.mkdtemp(prefix="daemon-", dir=DISK))
        cfg = state.parent / f"{state.name}.yaml"
        cfg.write_text(
            f"state_dir: {state}\nmetrics: {{enabled: false}}\n"
            f"storage:\n  key_file: {state / 'repository.key'}\n{storage}"
        )
        env = clean_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")

        def call(*args: str, cfg: Path = cfg, env: dict[str, str] = env) -> dict[str, Any]:
            cmd = [*CLI, args[0], "--config", str(cfg), "--json", *args[1:]]
            return run_json(cmd, f"checkpointer {' '.join(args)}", env)

        with open(state.parent / f"{state.name}.log", "w") as log:
            daemon = subprocess.Popen(
                [*CLI, "daemon", "--config", str(cfg)],
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        try:
            for _ in range(200):
                with contextlib.suppress(RuntimeError):
                    call("status")
                    break
                time.sleep(0.1)
            call("register", "w", "--pid", str(w.pid), "--no-auto-restore")
            out.setdefault(label, {}).setdefault("daemon_idle_rss_mb", []).append(
                _status_kb(daemon.pid, "VmRSS") / 1024
            )
            for r in range(rounds):
                if r:
                    w.mutate()
                call("checkpoint", "w")
                out[label].setdefault("daemon_peak_rss_mb", []).append(
                    _status_kb(daemon.pid, "VmHWM") / 1024
                )
            call("unregister", "w", "--keep-running")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
            shutil.rmtree(tmpfs_scratch_root(state), ignore_errors=True)
    return out


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def scheduler_at_scale(n: int, interval: int, duration: int, work: Path) -> dict[str, Any]:
    """n small managed workloads, all every `interval` s, in a real daemon: late or missed runs."""
    state = work / "scale"
    cfg = work / "scale.yaml"
    lines = [
        f"state_dir: {state}",
        "metrics: {enabled: false}",
        f"storage: {{key_file: {state / 'repository.key'}}}",
        "workloads:",
    ]
    for i in range(n):
        lines += [
            f"  - name: w{i:03d}",
            "    command: [sleep, '100000']",
            f"    every: {interval}s",
            "    restore: {on_crash: false}",
        ]
    cfg.write_text("\n".join(lines) + "\n")
    log = work / "scale.log"
    with open(log, "w") as f:
        daemon = subprocess.Popen(
            [PY, "-m", "checkpointer.cli", "daemon", "--config", str(cfg)],
            stdout=f,
            stderr=f,
            cwd=ROOT,
            env=clean_env(),
            start_new_session=True,
        )
    try:
        time.sleep(duration)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        # The daemon's workloads are now our children (we are a subreaper): kill them all,
        # then reap, or each teardown would wait for zombies only we can collect.
        reg = json.loads((state / "workloads.json").read_text())
        for w in reg["workloads"]:
            if w["pid"] and process.start_time(int(w["pid"])) == w["started"]:
                os.kill(int(w["pid"]), signal.SIGKILL)
        shutil.rmtree(tmpfs_scratch_root(state), ignore_errors=True)  # its kept images
        deadline = time.monotonic() + 30
        while any(process.state(int(w["pid"])) for w in reg["workloads"] if w["pid"]):
            reap()
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    text = log.read_text().splitlines()
    # "checkpoint ID of wNNN: ..." from the engine's loggers (checkpointer.engine.checkpointing)
    done = [ln for ln in text if CHECKPOINT_DONE.search(ln)]
    stamps = [time.mktime(time.strptime(ln[:19], "%Y-%m-%d %H:%M:%S")) for ln in done]
    # A round is a run of checkpoints with no gap longer than half the interval.
    rounds: list[list[float]] = []
    for t in sorted(stamps):
        if rounds and t - rounds[-1][-1] < interval / 2:
            rounds[-1].append(t)
        else:
            rounds.append([t])
    spread = max((r[-1] - r[0] for r in rounds), default=0.0)
    return {
        "workloads": n,
        "interval_s": interval,
        "duration_s": duration,
        "expected_runs": n * (duration // interval),
        "checkpoints": len(done),
        "skipped_overlap": sum("skipped" in ln for ln in text),
        "missed": sum("missed its time" in ln for ln in text),
        "failed": sum("failed" in ln for ln in text),
        "failed_lines": [ln for ln in text if "failed" in ln][:10],
        "rounds": len(rounds),
        "max_spread_within_a_round_s": spread,
    }
