"""Restore drills: what one costs, and whether the live workload feels it.

Two real daemons run side by side, one per priority a drill can run at
(checkpointer/criu/sandbox/priority.py: `idle`, SCHED_IDLE and the idle I/O class, the
default; `nice`, nice 10, the earlier behaviour), each with a counter server holding MB
megabytes (tests/programs/ballast_server.py) as a managed workload, checkpointed once. A
client asks the first counter for its count in a loop (one request at a time, as fast as it
answers) all along, while the bench goes ROUNDS times through: QUIET seconds of nothing, a
drill by one daemon, QUIET seconds, a drill by the other (which goes first alternates), then
QUIET seconds and a `verify` (the repository read back and checked, a command the project had
before drills, for comparison). Each answer counts for the phase it began in, so the quiet
answers and those during each kind of drill come from the same minutes: on this shared 2-core
machine the other load changes by the minute and would otherwise decide the ratios.

Measured: each drill's wall time and CPU (the daemon's own and its children's: CRIU, unshare,
the sandbox's init, from /proc/DAEMON/stat), and the p50/p99 of the answers in each phase,
p99 during drills divided by p99 in the quiet phases. Drills and verifies are asked of the
daemons' sockets directly: a CLI's start (~0.3 CPU-s of imports, at normal priority) is an
operator's command, not the drill, and a scheduled drill (drill.every) has none. The load
average at the end says what else ran.

Run: `python -m bench.drill --mb 100` (root). Prints a table, writes bench/results/drill.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from checkpointer.api import Op
from checkpointer.cli.client import Client, call
from tests.support.net import free_port, http_get

BALLAST = Path(__file__).resolve().parent.parent / "tests" / "programs" / "ballast_server.py"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and of its children it has waited for."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


PRIORITIES = ("nice", "idle")
Phase = tuple[str, float, float]  # what ran, from, to (perf_counter)


def ask_all_along(port: int, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """(when each request began, how long its answer took), one request after the other."""
    while not stop.is_set():
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        conn.getresponse().read()
        conn.close()
        out.append((t0, time.perf_counter() - t0))


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def run(mb: int, rounds: int, quiet: float) -> dict[str, Any]:
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drill-", dir=DISK))
    try:
        return _run(work, mb, rounds, quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, mb: int, rounds: int, quiet: float) -> dict[str, Any]:
    ports = {priority: free_port() for priority in PRIORITIES}
    with contextlib.ExitStack() as stack:
        daemons: dict[str, BenchDaemon] = {}
        for priority in PRIORITIES:
            (work / priority).mkdir()
            d = BenchDaemon(work / priority, CHECKPOINTER_DRILL_PRIORITY=priority)
            daemons[priority] = stack.enter_context(d)
            argv = [PY, str(BALLAST), str(ports[priority]), str(mb)]
            d.call("run", "w", "--no-auto-restore", "--", *argv)
            http_get(ports[priority], timeout=120)
            checkpoint = d.call("checkpoint", "w")
        phases, cpu, reports = _phases(daemons, ports[PRIORITIES[0]], rounds, quiet)
    assert all(r["result"] == "verified" for r in reports), reports
    return _summary(mb, checkpoint["size_bytes"], phases, cpu, reports)


def _phases(
    daemons: dict[str, BenchDaemon], port: int, rounds: int, quiet: float
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[dict[str, Any]]]:
    """The answers by phase, each daemon's drills' CPU, the drills' reports."""
    answers: list[tuple[float, float]] = []
    spans: list[Phase] = []
    cpu: dict[str, list[float]] = {priority: [] for priority in PRIORITIES}
    reports: list[dict[str, Any]] = []

    def phase(what: str, act: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        act()
        spans.append((what, t0, time.perf_counter()))

    def drill(priority: str) -> None:
        d = daemons[priority]
        assert d.proc is not None
        before = cpu_seconds(d.proc.pid)
        report = dict(call(d.state / "checkpointer.sock", Op.DRILL, name="w", checkpoint_id=None))
        cpu[priority].append(cpu_seconds(d.proc.pid) - before)
        reports.append(report | {"priority": priority})

    verifier = Client(daemons[PRIORITIES[0]].state / "checkpointer.sock")

    def verify() -> None:
        verifier.verify("w", None)

    stop = threading.Event()
    client = threading.Thread(target=ask_all_along, args=(port, stop, answers))
    client.start()
    try:
        for i in range(rounds):
            for priority in PRIORITIES if i % 2 == 0 else PRIORITIES[::-1]:
                phase("quiet", lambda: time.sleep(quiet))
                phase(priority, functools.partial(drill, priority))
            phase("quiet", lambda: time.sleep(quiet))
            phase("verify", verify)
    finally:
        stop.set()
        client.join()
    by_phase: dict[str, list[float]] = {}
    for began, took in answers:
        what = next((w for w, t0, t1 in spans if t0 <= began < t1), None)
        if what is not None:
            by_phase.setdefault(what, []).append(took)
    return by_phase, cpu, reports


def _summary(
    mb: int,
    image_bytes: int,
    phases: dict[str, list[float]],
    cpu: dict[str, list[float]],
    reports: list[dict[str, Any]],
) -> dict[str, Any]:
    quiet99 = p(phases["quiet"], 99)
    out: dict[str, Any] = {
        "mb": mb,
        "image_bytes": image_bytes,
        "answers_quiet": len(phases["quiet"]),
        "p50_ms_quiet": round(p(phases["quiet"], 50) * 1000, 2),
        "p99_ms_quiet": round(quiet99 * 1000, 2),
    }
    for what in (*PRIORITIES, "verify"):
        seen = phases.get(what) or [float("nan")]
        out[what] = {
            "answers": len(phases.get(what, [])),
            "p50_ms": round(p(seen, 50) * 1000, 2),
            "p99_ms": round(p(seen, 99) * 1000, 2),
            "p99_ratio": round(p(seen, 99) / quiet99, 2),
        }
        if what in PRIORITIES:
            walls = [r["duration_seconds"] for r in reports if r["priority"] == what]
            out[what] |= {
                "drills": len(walls),
                "drill_seconds": walls,
                "drill_seconds_median": round(statistics.median(walls), 3),
                "drill_cpu_seconds_median": round(statistics.median(cpu[what]), 2),
            }
    out["cores"] = os.cpu_count()
    out["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)  # other work on the host
    return out


def _quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds between drills")


def main() -> None:
    args = bench_args(__doc__, mb=100, rounds=8, out="drill.json", extra=_quiet)
    r = run(args.mb, args.rounds, args.quiet)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"image {r['image_bytes'] / 1e6:.0f} MB; load at the end {r['load_average_1m_at_end']}")
    print(f"quiet: p50/p99 {r['p50_ms_quiet']}/{r['p99_ms_quiet']} ms ({r['answers_quiet']})")
    for what in (*PRIORITIES, "verify"):
        m = r[what]
        cost = (
            f"; {m['drills']} drills, {m['drill_seconds_median']:.2f} s, "
            f"{m['drill_cpu_seconds_median']:.2f} CPU-s (median)"
            if what in PRIORITIES
            else ""
        )
        print(
            f"during {what}: p50/p99 {m['p50_ms']}/{m['p99_ms']} ms ({m['answers']}): "
            f"p99 x{m['p99_ratio']}{cost}"
        )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
