"""The daemon's memory while it checkpoints a big Redis (4 GB by default): its peak resident
set (VmHWM) after the first checkpoint and after a steady one (1% of the keys rewritten),
through the real CLI, on a local repository (encrypted, as by default), disk images on.

Memory should not grow with the image: the commit streams the image through fixed buffers and
its index keeps 32 bytes per distinct page.

Run: `python -m bench.big_checkpoint --mb 4000` (root). Prints a table, writes
bench/results/big_checkpoint.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DISK, BenchDaemon, bench_args
from bench.migration import fill, mutate
from tests.support.net import free_port
from tests.support.redis_server import redis_command

TARGET_MB = 150


def main() -> None:
    args = bench_args(__doc__, 4000, 1, "big_checkpoint.json")
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-big-", dir=DISK))
    try:
        with BenchDaemon(work) as d:
            port = free_port()
            d.call("run", "redis", "--no-auto-restore", "--", *redis_command(port))
            keys = fill(port, args.mb)
            idle = d.peak_rss_mb()
            first = d.call("checkpoint", "redis")
            after_first = d.peak_rss_mb()
            mutate(port, keys)
            steady = d.call("checkpoint", "redis")
            after_steady = d.peak_rss_mb()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {
        "mb": args.mb,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image_bytes": first["size_bytes"],
        "daemon_peak_rss_mb": {
            "before": idle,
            "after first checkpoint": after_first,
            "after steady checkpoint": after_steady,
        },
        "checkpoint_seconds": {
            "first": first["duration_seconds"],
            "steady": steady["duration_seconds"],
        },
        "stored_bytes": {"first": first["new_bytes"], "steady": steady["new_bytes"]},
        "target_mb": TARGET_MB,
    }
    print(render(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def render(r: dict[str, Any]) -> str:
    peak = max(r["daemon_peak_rss_mb"].values())
    verdict = "met" if peak <= r["target_mb"] else "MISSED"
    lines = [
        f"Daemon memory checkpointing Redis {r['mb']} MB (image {r['image_bytes'] / 1e6:.0f} MB)",
        "",
        "| when | daemon peak RSS | checkpoint | stored |",
        "|---|---|---|---|",
        f"| started, Redis filled | {r['daemon_peak_rss_mb']['before']:.0f} MB | | |",
    ]
    for phase in ("first", "steady"):
        lines.append(
            f"| after the {phase} checkpoint | "
            f"{r['daemon_peak_rss_mb'][f'after {phase} checkpoint']:.0f} MB | "
            f"{r['checkpoint_seconds'][phase]:.1f} s | {r['stored_bytes'][phase] / 1e6:.0f} MB |"
        )
    lines.append(f"| target: peak <= {r['target_mb']} MB | {peak:.0f} MB | {verdict} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
