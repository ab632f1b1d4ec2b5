"""A planned shutdown's final checkpoints: how long they take for N workloads, against the
stop budget (issue 29's "final checkpoint time for 10 workloads of 100 MB each").

N counter servers holding MB megabytes each (tests/programs/ballast_server.py) run as managed
workloads of a real daemon on a 1 h schedule; each is checkpointed once (its last scheduled
checkpoint), then asked once more (its count moves on, one page of its ballast rewritten:
what a reboot without a final checkpoint would lose). Then `checkpointer shutdown-checkpoint`
runs, as the unit's ExecStop does at a system shutdown: every tree frozen, dumped, made
durable (disk image and spool; the upload may finish after the boot), left stopped.
Measured: the whole command's wall time, each workload's, and how many fit in the budget
(that the final checkpoint holds the last count is tests/test_shutdown_checkpoint.py's).

Run: `python -m bench.shutdown --mb 100 --rounds 10` (root; --rounds is N). Writes
bench/results/shutdown.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DISK, PY, BenchDaemon, bench_args
from tests.support.net import free_port, http_get

BALLAST = Path(__file__).resolve().parent.parent / "tests" / "programs" / "ballast_server.py"
BUDGET = 90.0  # shutdown.budget's default


def run(mb: int, n: int) -> dict[str, Any]:
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shutdown-", dir=DISK))
    try:
        return _run(work, mb, n)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, mb: int, n: int) -> dict[str, Any]:
    ports = [free_port() for _ in range(n)]
    with BenchDaemon(work) as d:
        for i, port in enumerate(ports):
            argv = [PY, str(BALLAST), str(port), str(mb)]
            d.call("run", f"w{i}", "--every", "1h", "--no-auto-restore", "--", *argv)
            http_get(port, timeout=120)
        image = 0
        for i, port in enumerate(ports):
            image += d.call("checkpoint", f"w{i}")["size_bytes"]  # the last scheduled one
            http_get(port, path="/touch")  # after it: what a reboot would lose
        t0 = time.monotonic()
        r = d.call("shutdown-checkpoint", "--budget", f"{BUDGET:.0f}s")
        took = time.monotonic() - t0
    outcomes = r["workloads"]
    finals = [o for o in outcomes if o["result"] == "final"]
    per = [o["duration_seconds"] for o in finals]
    return {
        "mb": mb,
        "workloads": n,
        "image_bytes_total": image,
        "budget_seconds": BUDGET,
        "command_seconds": round(took, 2),
        "daemon_seconds": r["duration_seconds"],
        "final": len(finals),
        "kept": [(o["workload"], o["why"]) for o in outcomes if o["result"] != "final"],
        "per_workload_seconds": per,
        "per_workload_seconds_median": round(statistics.median(per), 2) if per else None,
        "per_workload_seconds_max": max(per) if per else None,
        "cores": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the host
    }


def main() -> None:
    args = bench_args(__doc__, mb=100, rounds=10, out="shutdown.json")
    r = run(args.mb, args.rounds)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(
        f"{r['final']} of {r['workloads']} workloads ({r['image_bytes_total'] / 1e6:.0f} MB of "
        f"images) checkpointed for the shutdown in {r['daemon_seconds']:.1f} s "
        f"(command {r['command_seconds']:.1f} s, budget {r['budget_seconds']:.0f} s); per "
        f"workload median {r['per_workload_seconds_median']} s, max "
        f"{r['per_workload_seconds_max']} s; load {r['load_average_1m_at_end']}"
    )
    if r["kept"]:
        print(f"kept their last checkpoint: {r['kept']}")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
