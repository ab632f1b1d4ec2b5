"""Restore drills: what one costs, and whether the live workload feels it, against the noise.

One counter server holding MB megabytes (tests/programs/ballast_server.py), started as a
managed workload would be, is the live workload. One real daemon per way of drilling
(VARIANTS: CHECKPOINTER_DRILL_PRIORITY, checkpointer/criu/sandbox/priority.py) adopts it and
checkpoints it once. A client asks the counter for its count in a loop (one request at a time,
as fast as it answers) all along, while the bench goes ROUNDS times (or until BUDGET seconds
have passed) through the windows, in an order that turns by one each round: a drill by each
daemon, and two baseline windows (`base-a`, `base-b`: nothing runs) as long as the drills'
median so far, with GAP seconds of nothing before each. Each answer counts for the window
it began in, so every window's answers come from the same minutes: on this shared 2-core
machine the other load changes by the minute and would otherwise decide the ratios.

The noise floor is p99(base-b) / p99(base-a): two windows of nothing, as far apart as the
machine's noise makes them. A drill "does not move" the workload's latency when its p99 over
p99(base, both windows) is within that. Each drill is split in its two phases by its report:
`rebuild` (the daemon reads the image from the repository, the workload's lock held) and
`sandbox` (CRIU restores it in the sandbox), and `after` is the second after it returned (the
kernel's clean-up of the sandbox: its memory, its namespaces).

Measured: each drill's wall time and phases, its CPU (the daemon's own threads: the rebuild;
its children: CRIU, unshare, the sandbox's init, from /proc/DAEMON/stat), and p50/p99 of the
answers per window kind. Drills are asked of the daemons' sockets directly: a CLI's start
(~0.3 CPU-s of imports) is an operator's command, not the drill. The load average before and
after says what else ran.

Run: `python -m bench.drill --mb 100` (root). Prints a table, writes bench/results/drill.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import DISK, PY, BenchDaemon, bench_args, kill, launch
from checkpointer.api import Op
from checkpointer.cli.client import call
from tests.support.net import free_port, http_get

BALLAST = Path(__file__).resolve().parent.parent / "tests" / "programs" / "ballast_server.py"
TICKS = os.sysconf("SC_CLK_TCK")
# The default (the sandbox at nice 19), SCHED_IDLE, SCHED_IDLE under a CPU quota (priority.py).
VARIANTS = ("nice", "idle", "idle,shm,throttle")
BASES = ("base-a", "base-b")
AFTER = 1.0  # seconds after a drill counted as its `after`


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime of `pid`'s threads, of the children it has waited for)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    own = (int(fields[11]) + int(fields[12])) / TICKS
    return own, (int(fields[13]) + int(fields[14])) / TICKS


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
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def run(
    mb: int, rounds: int, gap: float, budget: float, variants: tuple[str, ...]
) -> dict[str, Any]:
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drill-", dir=DISK))
    port = free_port()
    pid = launch([PY, str(BALLAST), str(port), str(mb)])
    try:
        http_get(port, timeout=120)
        with contextlib.ExitStack() as stack:
            daemons: dict[str, BenchDaemon] = {}
            for n, variant in enumerate(variants):
                (work / str(n)).mkdir()
                d = BenchDaemon(work / str(n), CHECKPOINTER_DRILL_PRIORITY=variant)
                daemons[variant] = stack.enter_context(d)
                d.call("register", "w", "--pid", str(pid), "--no-auto-restore")
                checkpoint = d.call("checkpoint", "w")
            load_before = os.getloadavg()[0]
            answers, spans, drills = _windows(daemons, port, rounds, gap, budget)
    finally:
        kill(pid)
        shutil.rmtree(work, ignore_errors=True)
    assert all(d["report"]["result"] == "verified" for d in drills), drills
    return _summary(mb, checkpoint["size_bytes"], answers, spans, drills, load_before)


Span = tuple[str, float, float]  # what ran, from, to (perf_counter)


def _windows(
    daemons: dict[str, BenchDaemon], port: int, rounds: int, gap: float, budget: float
) -> tuple[list[tuple[float, float]], list[Span], list[dict[str, Any]]]:
    """The answers, the windows they fall in, and each drill's report, wall time and CPU."""
    answers: list[tuple[float, float]] = []
    spans: list[Span] = []
    drills: list[dict[str, Any]] = []

    def drill(variant: str) -> None:
        d = daemons[variant]
        assert d.proc is not None
        own0, kids0 = cpu_seconds(d.proc.pid)
        t0 = time.perf_counter()
        report = dict(call(d.state / "checkpointer.sock", Op.DRILL, name="w", checkpoint_id=None))
        t1 = time.perf_counter()
        own1, kids1 = cpu_seconds(d.proc.pid)
        rebuilt = t0 + float(report.get("rebuild_seconds", 0.0))
        spans.extend([(variant, t0, t1), (f"{variant}:rebuild", t0, rebuilt)])
        spans.extend([(f"{variant}:sandbox", rebuilt, t1), (f"{variant}:after", t1, t1 + AFTER)])
        drills.append(
            {"variant": variant, "report": report, "wall": t1 - t0}
            | {"cpu_rebuild": own1 - own0, "cpu_sandbox": kids1 - kids0}
        )

    def base(label: str) -> None:
        walls = [d["wall"] for d in drills] or [0.5]
        t0 = time.perf_counter()
        time.sleep(statistics.median(walls))
        spans.append((label, t0, time.perf_counter()))

    windows = [*BASES, *daemons]
    stop = threading.Event()
    client = threading.Thread(target=ask_all_along, args=(port, stop, answers))
    client.start()
    try:
        end = time.monotonic() + budget
        for i in range(rounds):
            for what in windows[i % len(windows) :] + windows[: i % len(windows)]:
                time.sleep(gap)
                base(what) if what in BASES else drill(what)
            print(f"round {i + 1} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
            if time.monotonic() > end:  # the machine is shared: a busy one gets fewer rounds
                break
        time.sleep(AFTER)
    finally:
        stop.set()
        client.join()
    return answers, spans, drills


def _summary(
    mb: int,
    image_bytes: int,
    answers: list[tuple[float, float]],
    spans: list[Span],
    drills: list[dict[str, Any]],
    load_before: float,
) -> dict[str, Any]:
    by_label: dict[str, list[float]] = {}
    spans.sort(key=lambda s: s[1])
    for began, took in answers:
        for label, t0, t1 in spans:
            if t0 > began:
                break
            if began < t1:
                by_label.setdefault(label, []).append(took)
    base = by_label.get("base-a", []) + by_label.get("base-b", [])
    base99 = p(base, 99)

    def window(label: str) -> dict[str, Any]:
        seen = by_label.get(label, [])
        return {
            "answers": len(seen),
            "p50_ms": round(p(seen, 50) * 1000, 2),
            "p99_ms": round(p(seen, 99) * 1000, 2),
            "p99_ratio": round(p(seen, 99) / base99, 2),
        }

    out: dict[str, Any] = {
        "mb": mb,
        "image_bytes": image_bytes,
        "base": window("base-a") | {"p99_ms_b": round(p(by_label.get("base-b", []), 99) * 1000, 2)},
        "noise_p99_ratio_b_over_a": round(
            p(by_label.get("base-b", []), 99) / p(by_label.get("base-a", []), 99), 2
        ),
        "base_p99_ms": round(base99 * 1000, 2),
    }
    for variant in dict.fromkeys(d["variant"] for d in drills):
        mine = [d for d in drills if d["variant"] == variant]

        def median(key: str, mine: list[dict[str, Any]] = mine) -> float:
            return round(statistics.median(d[key] for d in mine), 3)

        out[variant] = window(variant) | {
            phase: window(f"{variant}:{phase}") for phase in ("rebuild", "sandbox", "after")
        }
        out[variant] |= {
            "drills": len(mine),
            "drill_seconds_median": median("wall"),
            "rebuild_seconds_median": round(
                statistics.median(d["report"].get("rebuild_seconds", 0.0) for d in mine), 3
            ),
            "rebuild_cpu_seconds_median": median("cpu_rebuild"),
            "sandbox_cpu_seconds_median": median("cpu_sandbox"),
        }
    out["cores"] = os.cpu_count()
    out["load_average_1m"] = {"before": round(load_before, 2), "after": os.getloadavg()[0]}
    return out


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gap", type=float, default=1.0, help="seconds before each window")
    parser.add_argument(
        "--budget", type=float, default=240.0, help="no round starts after this many seconds"
    )
    parser.add_argument(
        "--variants",
        default=";".join(VARIANTS),
        help="ways of drilling, ';'-separated (CHECKPOINTER_DRILL_PRIORITY values)",
    )


def main() -> None:
    args = bench_args(__doc__, mb=100, rounds=12, out="drill.json", extra=_extra)
    r = run(args.mb, args.rounds, args.gap, args.budget, tuple(args.variants.split(";")))
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    load = r["load_average_1m"]
    print(f"image {r['image_bytes'] / 1e6:.0f} MB; load {load['before']} -> {load['after']}")
    b = r["base"]
    print(
        f"baseline: p50 {b['p50_ms']} ms, p99 {b['p99_ms']} (a) / {b['p99_ms_b']} (b) ms "
        f"({b['answers']} answers a window): noise floor p99 b/a x{r['noise_p99_ratio_b_over_a']}"
    )
    for variant in args.variants.split(";"):
        m = r[variant]
        phases = ", ".join(f"{ph} x{m[ph]['p99_ratio']}" for ph in ("rebuild", "sandbox", "after"))
        print(
            f"{variant:28} p50/p99 {m['p50_ms']}/{m['p99_ms']} ms ({m['answers']}): "
            f"p99 x{m['p99_ratio']} ({phases}); {m['drill_seconds_median']:.2f} s "
            f"(rebuild {m['rebuild_seconds_median']:.2f}), CPU-s rebuild "
            f"{m['rebuild_cpu_seconds_median']:.2f} + sandbox {m['sandbox_cpu_seconds_median']:.2f}"
        )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
