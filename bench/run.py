"""Benchmarks: checkpointer side by side with raw CRIU, the seeds' dump+tar+zstd, and restic.

    make bench                       # everything (Redis 300 MB and 1 GB, a Python bytearray)
    .venv/bin/python bench/run.py --sizes 300 --rounds 3 --skip-scale   # a quicker run

Every method checkpoints the same live process in the same run, so ratios are comparable on
this shared, noisy machine. checkpointer's repository is encrypted, as by default; its local
pipeline is also measured in clear, alternating with it, for the encrypted / clear ratios.
Prints a table and writes bench/results/latest.json (machine, versions, medians and spreads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.daemon import daemon_checkpoints, scheduler_at_scale  # noqa: E402
from bench.harness import DISK, SHM, Recorder, kill, raw_dump  # noqa: E402
from bench.methods.base import Method  # noqa: E402
from bench.methods.checkpointer import (  # noqa: E402
    CheckpointerLocal,
    CheckpointerS3,
    restore_side_by_side,
)
from bench.methods.raw_criu import RawCriu  # noqa: E402
from bench.methods.restic import ResticLocal, ResticS3  # noqa: E402
from bench.methods.seeds import Seeds  # noqa: E402
from bench.methods.yardstick import Yardstick  # noqa: E402
from bench.workloads import PyArray, Redis, Workload  # noqa: E402
from checkpointer.criu import Criu  # noqa: E402
from checkpointer.workloads.reaper import become_subreaper  # noqa: E402
from tests.support.moto_server import Moto  # noqa: E402


def bench_workload(
    w: Workload, rounds: int, moto: Moto | None, work: Path, skip_restic: bool, firsts: int = 4
) -> dict[str, Any]:
    """Every method on the live workload: `rounds` checkpoints each (the workload rewriting 1%
    between rounds), what their stores hold, their restores, then the daemon's own RSS.

    checkpointer local runs twice, encrypted (the default) and in clear, one after the other
    in every round, the one going first alternating; each also makes `firsts` first (full)
    checkpoints in all, the extra ones into new repositories, for a median of first ones; their
    restores are interleaved one by one, 4 of each kind each."""
    criu = Criu("criu", work / "failed")
    rec = Recorder()
    bucket = moto.create_bucket(f"bench-{w.name.lower()}") if moto else None
    raw = RawCriu(rec, criu)
    methods: list[Method] = [raw, Yardstick(rec, raw, work), Seeds(rec, criu, work)]
    if not skip_restic:
        methods.append(ResticLocal(rec, criu, work))
        if moto:
            methods.append(ResticS3(rec, criu, moto, f"bench-{w.name.lower()}-restic"))
    pair = [CheckpointerLocal(rec, work), CheckpointerLocal(rec, work, encrypted=False)]
    methods += pair
    if moto and bucket:
        methods.append(CheckpointerS3(rec, work, moto, bucket))
    # One dump thrown away: just after loading, a 1 GB Redis's first dumps froze it anywhere
    # from 0.5 to 2.4 s, whichever method ran (the allocator and the kernel still settling).
    shutil.rmtree(raw_dump(criu, w.pid, SHM)[2])
    ck = methods.index(pair[0])
    for r in range(rounds):
        if r:
            w.mutate()
        methods[ck : ck + 2] = pair if r % 2 == 0 else pair[::-1]
        for m in methods:
            m.checkpoint(w, r)
    for i in range(1, firsts):
        for m in pair[::-1] if i % 2 else pair:
            m.another_first(w)
    for m in methods:
        m.rounds_done()
    for m in methods:
        stored = m.stored_bytes()
        if stored is not None:
            rec(m.label, "stored_after_all", stored)
    # Restores, each bringing the same tree back, so that the next one can kill it.
    pid = w.pid
    for m in methods:
        if m not in pair:
            pid = m.restore(pid)
    pid = restore_side_by_side(pair, pid)
    w.pid = pid
    assert w.alive_check(), "the workload did not survive the benchmark's restores"
    rec.extend(daemon_checkpoints(w, moto, bucket, work))
    return {m: {k: report.summarize(v) for k, v in d.items()} for m, d in rec.figures.items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="300,1000", help="Redis sizes in MB")
    ap.add_argument("--pyarray", type=int, default=256, help="bytearray MB (0: skip)")
    ap.add_argument("--rounds", type=int, default=10, help="checkpoints per method")
    ap.add_argument(
        "--firsts",
        type=int,
        default=4,
        help="first checkpoints per checkpointer local variant (encrypted, clear)",
    )
    ap.add_argument("--skip-restic", action="store_true")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument(
        "--report", action="store_true", help="only print the tables of --out's results"
    )
    a = ap.parse_args()
    if a.report:
        saved = json.loads(Path(a.out).read_text())
        text = report.render(saved)
        Path(a.out).with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    if os.geteuid() != 0:
        sys.exit("the benchmarks run CRIU: run them as root (make bench)")
    become_subreaper()
    for d in (SHM, DISK):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o700)
    moto = None if a.skip_s3 else Moto()
    results: dict[str, Any] = {
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "criu": Criu("criu", SHM).version(),
            "restic": subprocess.run(
                ["restic", "version"], capture_output=True, text=True
            ).stdout.strip()
            if not a.skip_restic
            else None,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": a.rounds,
        "firsts": a.firsts,
        "args": sys.argv[1:],
        "workloads": {},
    }
    loads: list[Callable[[], Workload]] = [partial(Redis, int(s)) for s in a.sizes.split(",") if s]
    if a.pyarray:
        loads.append(partial(PyArray, a.pyarray))
    try:
        for make in loads:
            w = make()
            try:
                work = Path(tempfile.mkdtemp(prefix="w-", dir=DISK))
                print(f"benchmarking {w.name} ...", flush=True)
                results["workloads"][w.name] = bench_workload(
                    w, a.rounds, moto, work, a.skip_restic, a.firsts
                )
            finally:
                kill(w.pid)
        if not a.skip_scale:
            print(f"scheduler at scale: {a.scale} workloads every 60 s ...", flush=True)
            results["scheduler_at_scale"] = scheduler_at_scale(a.scale, 60, 130, DISK)
    finally:
        if moto:
            moto.stop()
        shutil.rmtree(SHM, ignore_errors=True)
        shutil.rmtree(DISK, ignore_errors=True)
    text = report.render(results)
    print(text)
    if "scheduler_at_scale" in results:
        print(f"scheduler at scale: {results['scheduler_at_scale']}")
    out = Path(a.out)
    report.write(results, out, text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
