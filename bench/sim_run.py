"""One run of the fleet simulation (bench.fleet_scale): H hosts and N workloads on one
simulated bucket for a virtual duration, and the figures the report shows.

Rates. The liveness part (scan, watchdog, renewals, call polls, takeovers) runs the whole
duration for every host; its requests are divided by the duration. Checkpoints may be
simulated for a sample of the workloads (`commit_sample`) and for the first `commit_window`
seconds only (a full hour of every workload's commits is too slow for 10,000 workloads): their
requests are divided by the window and scaled up by the sample. GC runs hourly on every host
at a phase of its own; its requests per run are scaled to one run per host per `gc_every`
(and by the sample: what it reads grows with the manifests in the bucket).
"""

from __future__ import annotations

import collections
import gc
import logging
import random
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.sim_clock import EventLoop, VirtualClock
from bench.sim_fleet import STEPPED, Images, Settings, SimHost
from bench.sim_store import KINDS, SimStore
from storage.chunk_index import ChunkIndex
from storage.crypto import Sealed, new_master
from storage.manifest import CHUNK_SIZE

LIVENESS = ("start", "scan", "watchdog", "renew", "beat", "calls", "hook")
PRICE = {"GET": 0.0004, "HEAD": 0.0004, "PUT": 0.005, "PUT_IF": 0.005, "LIST": 0.005}
PRICE_UNIT = 1000  # AWS S3 standard, per 1,000 requests; DELETE is free
IMAGE_CHUNKS_256MIB = 256 * 1024 * 1024 // CHUNK_SIZE  # the image size
SORTED_BYTES_PER_CHUNK = 20  # two 64-bit words of the digest and a 32-bit pack number


@dataclass
class Scenario:
    hosts: int
    workloads: int
    latency: float = 0.015
    duration: float = 3600.0
    commit_sample: float = 1.0  # share of the workloads whose checkpoints are simulated
    commit_window: float | None = None  # checkpoints only in the first seconds (None: all)
    kill_at: float | None = None  # the first host is killed then
    throttle: bool = True
    seed: int = 1
    settings: Settings = field(default_factory=Settings)

    def label(self) -> str:
        return f"{self.hosts} x {self.workloads} @ {self.latency * 1000:g} ms"


def simulate(sc: Scenario) -> dict[str, Any]:
    """Run the scenario; the figures as plain data (the JSON of the report)."""
    wall0, cpu0 = time.monotonic(), time.process_time()
    clock = VirtualClock()
    loop = EventLoop(clock)
    bucket = SimStore(clock, sc.latency, sc.throttle)
    bucket.horizon = sc.duration
    codec = Sealed(new_master())
    rng = random.Random(sc.seed)
    names = [f"w{i:05d}" for i in range(sc.workloads)]
    # Spread over the hosts (every host owns some), the same ones for the same seed.
    sampled = set(rng.sample(names, round(sc.workloads * min(1.0, sc.commit_sample))))
    window = sc.duration if sc.commit_window is None else min(sc.commit_window, sc.duration)
    settings = sc.settings
    settings.commit_until = window
    with tempfile.TemporaryDirectory(prefix="fleet-scale-", dir="/dev/shm") as tmp:
        images = Images(Path(tmp) / "images")
        hosts = [
            SimHost(
                f"h{j:03d}",
                bucket,
                codec,
                loop,
                Path(tmp) / f"h{j:03d}",
                settings,
                images,
                sampled.__contains__,
                wall_offset=rng.uniform(-0.5, 0.5),
            )
            for j in range(sc.hosts)
        ]
        for j, host in enumerate(hosts):
            host.start(rng.uniform(0, settings.renew_every), names[j :: sc.hosts])
        victim: set[str] = set()
        if sc.kill_at is not None:

            def kill() -> None:
                victim.update(hosts[0].running)
                hosts[0].kill()

            loop.at(sc.kill_at, kill)
        logging.disable(logging.CRITICAL)  # the daemon's warnings, thousands of them
        try:
            loop.run(sc.duration)
        finally:
            logging.disable(logging.NOTSET)
        bucket.close_gaps(sc.duration)
        out = _figures(sc, bucket, hosts, victim, window, len(sampled))
    out["wall_seconds"] = round(time.monotonic() - wall0, 1)
    out["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    return out


def _figures(
    sc: Scenario,
    bucket: SimStore,
    hosts: list[SimHost],
    victim: set[str],
    window: float,
    sampled: int,
) -> dict[str, Any]:
    s = sc.settings
    alive = [h for h in hosts if h.alive]
    rates = _rates(sc, bucket, hosts, window, sampled)
    total = {k: sum(p.get(k, 0.0) for p in rates.values()) for k in KINDS}
    ticks = sc.duration / s.renew_every
    per_tick = [
        sum(
            n
            for (host, act, _), n in bucket.by_activity.items()
            if host == h.id and act in LIVENESS
        )
        / ticks
        for h in alive
    ]
    gaps = bucket.liveness.gap
    takeovers = [t for t in bucket.liveness.takeovers if t.key.startswith("leases/")]
    first: dict[str, float] = {}
    for t in takeovers:
        if sc.kill_at is not None and t.key.removeprefix("leases/") in victim:
            first.setdefault(t.key, t.at - sc.kill_at)
    prefixes: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (kind, prefix), n in bucket.counts.items():
        prefixes[prefix][kind] = round(n / sc.duration, 2)
    return {
        "scenario": {
            **asdict(sc),
            "label": sc.label(),
            "commit_window": window,
            "sampled": sampled,
        },
        "requests_per_s": {k: round(v, 2) for k, v in total.items()},
        "requests_per_s_by_part": {
            p: {k: round(v, 2) for k, v in kinds.items()} for p, kinds in rates.items()
        },
        "get_per_s": round(total["GET"] + total["HEAD"], 1),
        "cost_per_host_hour": round(_dollars_per_hour(total) / sc.hosts, 4),
        "cost_per_host_hour_by_part": {
            p: round(_dollars_per_hour(kinds) / sc.hosts, 4) for p, kinds in rates.items()
        },
        # The object whose renewals say a host is alive: each lease before issue 27, the
        # host's heartbeat after (leases then change only on hand-over or takeover).
        "renewed": "hosts" if STEPPED else "leases",
        "largest_renewal_gap": _largest(gaps, "hosts" if STEPPED else "leases"),
        "largest_lease_gap": _largest(gaps, "leases"),
        "largest_heartbeat_gap": _largest(gaps, "hosts"),
        "spurious_takeovers": sum(t.previous_alive for t in takeovers),
        "takeovers": len(takeovers),
        "killed_workloads": len(victim),
        "failed_over": len(first),
        "failover_seconds": round(max(first.values()), 2)
        if victim and len(first) == len(victim)
        else None,
        "lost_leases": sum(h.record.lost for h in alive),
        "freezes": sum(h.record.freezes for h in alive),
        "commits": sum(h.record.commits for h in hosts),
        "commit_failures": sum(h.record.commit_failures for h in hosts),
        "skipped_not_owner": sum(h.record.skipped_not_owner for h in hosts),
        "gc_runs": sum(h.record.gc_runs for h in hosts),
        "liveness_requests_per_host_tick": {
            "max": round(max(per_tick, default=0.0), 1),
            "mean": round(sum(per_tick) / max(1, len(per_tick)), 1),
            "own_workloads_max": max((len(h.running) for h in alive), default=0),
        },
        "throttled": sum(bucket.throttled.values()),
        "peak_per_prefix_per_s": {f"{p} {r}": n for (p, r), n in sorted(bucket.peak.items())},
        "requests_per_s_by_prefix": dict(prefixes),
        "memory_per_host": _memory(alive[:: max(1, len(alive) // 3)][:3]),
        "scan_busy_share": round(
            max((h.lanes["scan"].busy for h in alive), default=0.0) / sc.duration, 3
        ),
    }


def _rates(
    sc: Scenario, bucket: SimStore, hosts: list[SimHost], window: float, sampled: int
) -> dict[str, dict[str, float]]:
    """Requests a second fleet-wide, by part and kind (the module's docstring: the scaling)."""
    scale = sc.workloads / sampled if sampled else 0.0
    gc_runs = sum(h.record.gc_runs for h in hosts)
    out: dict[str, dict[str, float]] = {"liveness": {}, "checkpoints": {}, "gc": {}}
    for (_, activity, kind), n in bucket.by_activity.items():
        if kind == "THROTTLED":
            continue
        if activity in LIVENESS:
            part, rate = "liveness", n / sc.duration
        elif activity == "gc":
            part = "gc"
            rate = n / gc_runs * sc.hosts / sc.settings.gc_every * scale if gc_runs else 0.0
        else:
            part, rate = "checkpoints", n / window * scale
        out[part][kind] = out[part].get(kind, 0.0) + rate
    return out


def _dollars_per_hour(rates: dict[str, float]) -> float:
    return sum(v * PRICE.get(k, 0.0) / PRICE_UNIT for k, v in rates.items()) * 3600


def _largest(gaps: dict[tuple[str, str], float], kind: str) -> float:
    return round(max((v for (_, k), v in gaps.items() if k == kind), default=0.0), 2)


def _memory(sample: list[SimHost]) -> dict[str, float]:
    """Bytes a host holds for fleet state (its Fleet: leases and hosts seen, the watchdog),
    for the repository's own state (heads seen, manifest summaries) and for its dedup indexes,
    the largest of a few hosts, measured object by object; and the index projected to every
    workload the host owns with 256 MiB images (the simulated images are 16 pages, and only a
    sample of the workloads commits)."""
    fleet_state = repo_state = index = chunks = own = 0
    for h in sample:
        shared: list[object] = [h, h.bucket, h.repo.backend, h.repo.codec, h.loop, h.clock]
        fleet_state = max(fleet_state, deep_size([h.fleet], [*shared, h.repo]))
        repo_state = max(repo_state, deep_size([h.repo], [*shared, h.repo.dedup]))
        indexes = h.repo.dedup._indexes
        size = deep_size([indexes], shared)
        if size > index:
            index, own = size, len(h.running)
            chunks = sum(len(i) for i, _ in indexes.values())
    # A chunk costs 20 bytes once merged into the index's sorted arrays (storage/chunk_index.py;
    # the simulated images are small enough to sit in its dict of recent additions, ~130).
    per_workload = deep_size([ChunkIndex()]) + SORTED_BYTES_PER_CHUNK * IMAGE_CHUNKS_256MIB
    return {
        "fleet_state_bytes": fleet_state,
        "repository_state_bytes": repo_state,
        "dedup_index_bytes": index,
        "dedup_index_chunks": chunks,
        "own_workloads": own,
        "index_projected_256mib_bytes": per_workload * own,
        "hosts_measured": len(sample),
    }


def deep_size(roots: list[object], shared: list[object] = ()) -> int:  # type: ignore[assignment]
    """Bytes of everything reachable from `roots` (numpy arrays with their data), except what
    `shared` holds and classes, modules, functions and bound methods."""
    skip = (
        type,
        types.ModuleType,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.MethodType,
    )
    seen: set[int] = {id(o) for o in shared}
    todo = list(roots)
    size = 0
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        size += sys.getsizeof(o)
        todo.extend(gc.get_referents(o))
    return size
