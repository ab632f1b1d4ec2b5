"""Restore speed on one Redis, side by side in one run: raw `criu restore` of an image on
tmpfs (the floor), the daemon's restore after a reboot (no kept image: rebuilt from the local
repository, encrypted as by default), the same lazily (`restore --lazy`: pages on demand),
and from the kept image. Each is timed from the command to the first answer with every key
(`DBSIZE`), the lazy one also to its last page.

Run: `python -m bench.restore_speed --mb 1000` (root). Prints a table, writes
bench/results/restore_speed.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import CLI, DISK, ROOT, SHM, clean_env, kill, run_json
from bench.migration import fill, first_answer
from bench.report import summarize
from checkpointer.criu import Criu, DumpOptions
from checkpointer.engine import tmpfs_scratch_root
from tests.support.net import free_port
from tests.support.processes import kill_tree
from tests.support.redis_server import redis_command

ROUNDS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "restore_speed.json"
    )
    args = parser.parse_args()
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=DISK))
    state = work / "state"
    cfg = work / "config.yaml"
    cfg.write_text(
        f"state_dir: {state}\nmetrics: {{enabled: false}}\n"
        f"storage:\n  key_file: {state / 'repository.key'}\n"
    )
    env = clean_env()

    def call(*a: str) -> dict[str, Any]:
        return run_json([*CLI, a[0], "--config", str(cfg), "--json", *a[1:]], " ".join(a), env)

    log = open(work / "daemon.log", "w")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen([*CLI, "daemon", "--config", str(cfg), "--stop-workloads-on-exit"],
                              stdout=log, stderr=log,
                              cwd=ROOT, env=env)  # fmt: skip
    times: dict[str, list[float]] = {"raw criu": [], "after reboot": [], "lazy": [], "kept": []}
    lazy_all: list[float] = []
    raw_dir = SHM / f"bench-raw-{work.name}"
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*CLI, "status", "--config", str(cfg)], capture_output=True,
                             env=env).returncode != 0:  # fmt: skip
            assert time.monotonic() < deadline, (work / "daemon.log").read_text()
            time.sleep(0.2)
        port = free_port()
        call("run", "redis", "--no-auto-restore", "--", *redis_command(port))
        keys = fill(port, args.mb)
        call("checkpoint", "redis")
        criu = Criu("criu", work / "failed")
        for _ in range(args.rounds):
            pid = _pid(cfg, env)
            # raw CRIU: the same tree dumped to tmpfs, killed, restored from there
            shutil.rmtree(raw_dir, ignore_errors=True)
            raw_dir.mkdir(parents=True)
            criu.dump(pid, raw_dir, DumpOptions(), "bench")
            kill_tree(pid)
            t0 = time.time()
            raw_pid, _ = criu.restore(raw_dir, DumpOptions(), "bench")
            times["raw criu"].append(first_answer(port, keys) - t0)
            kill(raw_pid)
            shutil.rmtree(raw_dir, ignore_errors=True)
            for kind, extra in (("after reboot", ["--full"]), ("lazy", ["--lazy"])):
                shutil.rmtree(tmpfs_scratch_root(state) / "hot", ignore_errors=True)
                t0 = time.time()
                call("restore", "redis", *extra)
                times[kind].append(first_answer(port, keys) - t0)
                if kind == "lazy":
                    lazy_all.append(_all_pages(work / "daemon.log", len(lazy_all) + 1) - t0)
                call("checkpoint", "redis")  # a kept image for the next row
                kill_tree(_pid(cfg, env))
            t0 = time.time()
            call("restore", "redis")
            times["kept"].append(first_answer(port, keys) - t0)
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)
        log.close()
        shutil.rmtree(tmpfs_scratch_root(state), ignore_errors=True)
        shutil.rmtree(raw_dir, ignore_errors=True)
        if (work / "daemon.log").exists():
            shutil.copy(work / "daemon.log", DISK / "restore_speed.daemon.log")  # to read after
        shutil.rmtree(work, ignore_errors=True)
    raw = summarize(times["raw criu"])["median"]
    results: dict[str, Any] = {
        "mb": args.mb,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": {k: summarize(v) for k, v in times.items()},
        "lazy_all_pages_seconds": summarize(lazy_all),
        "ratio_to_raw": {k: summarize(v)["median"] / raw for k, v in times.items()},
    }
    lines = [f"Redis {args.mb} MB: command to first answer with every key (medians of "
             f"{args.rounds})", ""]  # fmt: skip
    for k in times:
        s = results["seconds"][k]["median"]
        lines.append(f"{k:<14} {s:7.2f} s   {results['ratio_to_raw'][k]:5.2f}x raw")
    lines.append(f"lazy, last page arrived {results['lazy_all_pages_seconds']['median']:.2f} s")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def _pid(cfg: Path, env: dict[str, str]) -> int:
    out = subprocess.run([*CLI, "status", "redis", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return int(json.loads(out.stdout)[0]["pid"])


def _all_pages(log: Path, nth: int, timeout: float = 600) -> float:
    """When (wall time) the daemon logged the nth "all pages arrived" (its log line's time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [ln for ln in log.read_text().splitlines() if "all pages arrived" in ln]
        if len(done) >= nth:
            stamp = done[nth - 1][:23]
            return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + float(
                "0." + stamp[20:23]
            )
        time.sleep(0.1)
    raise RuntimeError("the lazy restore never finished")


if __name__ == "__main__":
    main()
