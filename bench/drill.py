"""Restore drills: what one costs, and whether the live workload feels it.

A counter server holding MB megabytes (tests/programs/ballast_server.py) runs as a managed
workload of a real daemon; it is checkpointed once, then a client asks it for its count in a
loop (one request at a time, as fast as it answers) for WINDOW seconds without any drill and
again while `checkpointer drill` runs back to back. Measured: each drill's wall time and CPU
(the daemon's own and its children's: CRIU, unshare, the sandbox's init, from
/proc/DAEMON/stat), and the p50/p99 of the client's answers in both windows, p99 during drills
divided by p99 without; and the same while as many `verify` run (the repository read back and
checked, a command the project had before drills), for comparison. The drill rebuilds the
image from the repository (seeded from the kept image, as a restore is) and restores it in
the sandbox. The machine has 2 cores; the load average at the end says what else ran.

Each priority a drill can run at (checkpointer/criu/sandbox_priority.py: `idle`, SCHED_IDLE
and the idle I/O class, the default; `nice`, nice 10, the earlier behaviour) is measured in
the same run, one daemon each, one after the other, so that their ratios sit side by side
under the same load.

Run: `python -m bench.drill --mb 100` (root). Prints a table, writes bench/results/drill.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import DISK, PY, BenchDaemon, bench_args
from tests.support.net import free_port, http_get

BALLAST = Path(__file__).resolve().parent.parent / "tests" / "programs" / "ballast_server.py"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and of its children it has waited for."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


def latencies(port: int, seconds: float, stop: threading.Event | None = None) -> list[float]:
    """Seconds each answer took, one request after the other, for `seconds` (or until
    `stop`)."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        conn.getresponse().read()
        conn.close()
        out.append(time.perf_counter() - t0)
    return out


def while_asking(
    port: int, times: int, op: Callable[[], dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[float]]:
    """`op` run `times` times while a client asks the counter: its reports, the latencies."""
    done = threading.Event()
    seen: list[float] = []
    client = threading.Thread(target=lambda: seen.extend(latencies(port, 3600, done)))
    client.start()
    try:
        return [op() for _ in range(times)], seen
    finally:
        done.set()
        client.join()


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


PRIORITIES = ("nice", "idle")


def run(mb: int, drills: int, window: float) -> dict[str, Any]:
    """Both priorities, the earlier one first; each with a daemon of its own."""
    out: dict[str, Any] = {}
    for priority in PRIORITIES:
        DISK.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="drill-", dir=DISK))
        try:
            out[priority] = _run(work, mb, drills, window, priority)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _run(work: Path, mb: int, drills: int, window: float, priority: str) -> dict[str, Any]:
    port = free_port()
    with BenchDaemon(work, CHECKPOINTER_DRILL_PRIORITY=priority) as d:
        assert d.proc is not None
        daemon = d.proc.pid
        d.call("run", "w", "--no-auto-restore", "--", PY, str(BALLAST), str(port), str(mb))
        http_get(port, timeout=120)
        checkpoint = d.call("checkpoint", "w")
        quiet = latencies(port, window)
        cpu: list[float] = []

        def one_drill() -> dict[str, Any]:
            before = cpu_seconds(daemon)
            report = d.call("drill", "w")
            cpu.append(cpu_seconds(daemon) - before)
            return report

        reports, busy = while_asking(port, drills, one_drill)
        # The same number of `verify` (every chunk read back and checked): a read of the
        # repository the project already had, for comparison.
        _, verifying = while_asking(port, drills, lambda: d.call("verify", "w"))
    assert all(r["result"] == "verified" for r in reports), reports
    walls = [r["duration_seconds"] for r in reports]
    return {
        "priority": priority,
        "mb": mb,
        "image_bytes": checkpoint["size_bytes"],
        "drills": drills,
        "drill_seconds": walls,
        "drill_cpu_seconds": [round(c, 2) for c in cpu],
        "drill_seconds_median": round(statistics.median(walls), 3),
        "drill_cpu_seconds_median": round(statistics.median(cpu), 2),
        "answers_without": len(quiet),
        "answers_during": len(busy),
        "p50_ms_without": round(p(quiet, 50) * 1000, 2),
        "p99_ms_without": round(p(quiet, 99) * 1000, 2),
        "p50_ms_during": round(p(busy, 50) * 1000, 2),
        "p99_ms_during": round(p(busy, 99) * 1000, 2),
        "p99_ratio": round(p(busy, 99) / p(quiet, 99), 2),
        "p99_ms_during_verify": round(p(verifying, 99) * 1000, 2),
        "p99_ratio_verify": round(p(verifying, 99) / p(quiet, 99), 2),
        "cores": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the host
    }


def _window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, default=10.0, help="seconds of answers each")


def main() -> None:
    args = bench_args(
        __doc__,
        mb=100,
        rounds=5,
        out="drill.json",
        extra=_window,
    )
    runs = run(args.mb, args.rounds, args.window)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")
    for priority, r in runs.items():
        print(f"{priority}: image {r['image_bytes'] / 1e6:.0f} MB, {r['drills']} drills")
        print(
            f"  drill: {r['drill_seconds_median']:.2f} s, "
            f"{r['drill_cpu_seconds_median']:.2f} CPU-s (median)"
        )
        print(
            f"  answers p50/p99 without drills {r['p50_ms_without']}/{r['p99_ms_without']} ms,"
            f" during {r['p50_ms_during']}/{r['p99_ms_during']} ms: p99 x{r['p99_ratio']} "
            f"(during as many `verify`: x{r['p99_ratio_verify']}); load "
            f"{r['load_average_1m_at_end']}"
        )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
