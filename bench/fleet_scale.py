"""A fleet of H hosts and N workloads on one bucket, simulated with the project's real fleet,
lease, commit, retention and GC code (issue 27): requests by kind and prefix, their cost, the
daemon's memory for fleet state and dedup index, renewal gaps, spurious takeovers and the
failover of a killed host, for (10, 1,000) and (100, 10,000) at 15 ms and 100 ms a request,
and requests/s against N and against H (the PNG).

    python -m bench.fleet_scale             # bench/results/fleet_scale.json and .png
    python -m bench.fleet_scale --before    # the same, saved as fleet_scale-before.*
    python -m bench.fleet_scale --quick     # small fleets only (a minute or two)

How it runs (bench/sim_clock.py, sim_store.py, sim_fleet.py, sim_run.py): one thread, a
virtual clock and an event loop; each host's daemon threads are lanes of workers; each request
costs its task the latency; S3's per-prefix rates are enforced (503 SlowDown, retried by the
daemon's retrying layer). Liveness runs the whole virtual duration on every host; checkpoints
(a commit of a small image every 60 s, retention after each, GC hourly) run for a sample of
the workloads, scaled up in the rates. The first host is killed a third of the way through.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.sim_run import Scenario, simulate
from bench.sim_store import KINDS
from checkpointer.daemon.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MAIN = ((10, 1000), (100, 10000))
LATENCIES = (0.015, 0.1)
SWEEP_H, SWEEP_N = 10, 1000  # requests/s against N at SWEEP_H hosts, against H at SWEEP_N
SWEEP_NS = (250, 500, 1000, 2000)
SWEEP_HS = (2, 5, 10, 20)
METHOD = [
    "one thread, a virtual clock; a task (one call of the daemon's code) runs whole at its start "
    "time and its requests one after another, each costing the latency",
    "liveness (the fleet's loops, renewals, call polls, takeovers) runs the whole duration on "
    "every host",
    "checkpoints: a commit of a 16-page image and a small file every 60 s (15 pages unchanged) "
    "with retention keep_last 10 after each, for a sample of the workloads, scaled up by "
    "workloads/sampled; GC hourly at a phase of each host's, scaled to one run per host per hour",
    "gc_grace 600 s, for the steady state within the hour (reused packs older than grace/2 are "
    "looked up before a manifest, unreferenced ones deleted)",
    "S3's per-prefix rates (5,500 GET/HEAD, 3,500 others per second, top-level prefix): 503 "
    "SlowDown, not billed, retried by the daemon's RetryingBlobStore with its backoff in virtual "
    "time (tenacity's stop_after_delay counts real time and never fires here)",
    "prices: PUT, conditional PUT, LIST $0.005 per 1,000; GET, HEAD $0.0004 per 1,000; DELETE free",
    "host h000 is killed at a third of the duration; failover: the first takeover of each of its "
    "leases, from the kill",
    "memory: object by object, the largest of 3 hosts: the Fleet, the Repository's own state, "
    "the dedup indexes; the index projected to 256 MiB images for every workload the host owns",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", action="store_true", help="save as fleet_scale-before.*")
    ap.add_argument("--quick", action="store_true", help="small fleets only")
    ap.add_argument("--duration", type=float, default=3600.0, help="virtual seconds a run")
    ap.add_argument(
        "--big-duration",
        type=float,
        default=None,
        help="virtual seconds of the (100, 10,000) runs (default: --duration)",
    )
    ap.add_argument(
        "--commit-workloads",
        type=int,
        default=100,
        help="workloads whose checkpoints are simulated in each main run (a sample)",
    )
    ap.add_argument("--sweep-duration", type=float, default=600.0)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--only",
        metavar="HxN",
        help="one fleet only, e.g. 10x1000 (no sweep; with --latency, one latency)",
    )
    ap.add_argument("--latency", type=float, help="seconds a request (default: 0.015 and 0.1)")
    ap.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    ap.add_argument(
        "--sweep-only", action="store_true", help="only the sweep: fleet_scale[-before]-sweep.*"
    )
    args = ap.parse_args()

    console = Console(width=160)
    main_runs = [(h, n) for h, n in MAIN if not args.quick or n <= 1000]
    if args.quick:
        main_runs = [(5, 200), (10, 1000)]
    stem = "fleet_scale-before" if args.before else "fleet_scale"
    if args.quick:
        stem += "-quick"
    if args.sweep_only:
        main_runs = []
        stem += "-sweep"
    if args.only:
        hosts_s, _, workloads_s = args.only.partition("x")
        if not (hosts_s.isdigit() and workloads_s.isdigit()):
            ap.error(f"--only {args.only!r}: give hosts x workloads, e.g. --only 10x1000")
        main_runs = [(int(hosts_s), int(workloads_s))]
        args.no_sweep = True
    latencies = LATENCIES if args.latency is None else (args.latency,)
    runs: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    doc = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": _code_version(),
        "liveness": "heartbeats (Fleet.step)" if hasattr(Fleet, "step") else "per-lease renewals",
        "method": METHOD,
        "runs": runs,
        "sweep": sweep,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"{stem}.json"

    def save() -> None:  # after every run: a long report keeps what it measured
        out.write_text(json.dumps(doc, indent=2) + "\n")

    for hosts, workloads in main_runs:
        duration = args.duration
        if workloads >= 10000 and args.big_duration is not None:
            duration = args.big_duration
        for latency in latencies:
            sc = Scenario(
                hosts,
                workloads,
                latency,
                duration=duration,
                commit_sample=min(1.0, args.commit_workloads / workloads),
                kill_at=duration / 3,
            )
            console.print(f"[dim]running {sc.label()}, {duration:g} virtual s ...[/]")
            runs.append(simulate(sc))
            console.print(f"[dim]  done in {runs[-1]['wall_seconds']} s[/]")
            save()
    if not args.no_sweep and not args.quick:
        points = {(SWEEP_H, n) for n in SWEEP_NS} | {(h, SWEEP_N) for h in SWEEP_HS}
        for hosts, workloads in sorted(points):
            sc = Scenario(
                hosts,
                workloads,
                0.015,
                duration=args.sweep_duration,
                commit_sample=min(1.0, 20 / workloads),
            )
            console.print(f"[dim]sweep {sc.label()} ...[/]")
            sweep.append(_brief(simulate(sc)))
            save()
    for t in tables(runs) if runs else []:
        console.print(t)
    console.print(f"written {out}")
    if sweep:
        before = _before_sweep()
        png = plot(
            doc, RESULTS / f"{stem.removesuffix('-sweep')}.png", None if args.before else before
        )
        if png is not None:
            console.print(f"written {png.relative_to(ROOT)}")


def _before_sweep() -> Path | None:
    """The results of today's code that hold a sweep, if any."""
    for name in ("fleet_scale-before.json", "fleet_scale-before-sweep.json"):
        path = RESULTS / name
        if path.exists() and json.loads(path.read_text()).get("sweep"):
            return path
    return None


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    sc = run["scenario"]
    return {
        "hosts": sc["hosts"],
        "workloads": sc["workloads"],
        "requests_per_s": run["requests_per_s"],
        "requests_per_s_by_part": run["requests_per_s_by_part"],
        "cost_per_host_hour": run["cost_per_host_hour"],
        "wall_seconds": run["wall_seconds"],
    }


def _code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "storage", "checkpointer"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return sha + (" with uncommitted changes" if dirty else "")


def tables(runs: list[dict[str, Any]]) -> list[Table]:
    """Two tables: what the fleet asks of the bucket, and what it gets for it."""
    asks = Table(title="fleet_scale: requests/s fleet-wide (checkpoints and GC scaled up)")
    gets = Table(title="fleet_scale: liveness, failover and memory per host")
    for col in ("H x N @ latency", *KINDS, "GET+HEAD/s", "$/host-hour", "throttled"):
        asks.add_column(col, justify="right")
    for col in (
        "H x N @ latency",
        "renewal gap s",
        "heartbeat gap s",
        "spurious takeovers",
        "failover s",
        "leases lost",
        "liveness req/host-tick",
        "fleet state MB",
        "index MB (256 MiB images)",
    ):
        gets.add_column(col, justify="right")
    for r in runs:
        rq, mem = r["requests_per_s"], r["memory_per_host"]
        tick = r["liveness_requests_per_host_tick"]
        failover = r["failover_seconds"]
        label = r["scenario"]["label"]
        asks.add_row(
            label,
            *(f"{rq[k]:,.1f}" for k in KINDS),
            f"{r['get_per_s']:,.0f}",
            f"{r['cost_per_host_hour']:.3f}",
            f"{r['throttled']:,}",
        )
        gets.add_row(
            label,
            _renewal_gap(r),
            f"{r['largest_heartbeat_gap']:.1f}",
            str(r["spurious_takeovers"]),
            "not all" if failover is None else f"{failover:.1f}",
            str(r["lost_leases"] + r["freezes"]),
            f"{tick['max']:.0f} (owns {tick['own_workloads_max']})",
            f"{mem['fleet_state_bytes'] / 1e6:.1f}",
            f"{mem['index_projected_256mib_bytes'] / 1e6:.0f}",
        )
    return [asks, gets]


def _renewal_gap(run: dict[str, Any]) -> str:
    """The largest gap between two renewals of what says a host is alive (results written
    before `renewed` existed renewed leases)."""
    renewed = run.get("renewed", "leases")
    gap = run.get("largest_renewal_gap", run["largest_lease_gap"])
    return f"{gap:.1f} ({renewed})"


def plot(doc: dict[str, Any], path: Path, before: Path | None) -> Path | None:
    """Requests/s fleet-wide against N (H fixed) and against H (N fixed); today's code dashed
    when its results are there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[dev]'): no PNG")
        return None
    series = [("now" if before else "", doc["sweep"], "-")]
    if before is not None and before.exists():
        series.append(("today's code", json.loads(before.read_text())["sweep"], "--"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    groups = {"GET+HEAD": ("GET", "HEAD"), "PUT+PUT_IF": ("PUT", "PUT_IF"), "LIST": ("LIST",)}
    colours = dict(zip(groups, ("tab:blue", "tab:red", "tab:green"), strict=True))
    for ax, fixed, free, xs_label in (
        (axes[0], ("hosts", SWEEP_H), "workloads", f"workloads N ({SWEEP_H} hosts)"),
        (axes[1], ("workloads", SWEEP_N), "hosts", f"hosts H ({SWEEP_N:,} workloads)"),
    ):
        for name, points, style in series:
            pts = sorted((p for p in points if p[fixed[0]] == fixed[1]), key=lambda p: p[free])
            for group, kinds in groups.items():
                ys = [sum(p["requests_per_s"][k] for k in kinds) for p in pts]
                label = f"{group} {name}".strip()
                xs = [p[free] for p in pts]
                ax.plot(xs, ys, style, marker="o", color=colours[group], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xs_label)
        ax.set_ylabel("requests/s, fleet-wide (15 ms a request)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("bench.fleet_scale: what the fleet asks of the bucket")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
