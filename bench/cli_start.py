"""How long a CLI command takes before and around its one request to the daemon: every
`checkpointer restore` pays it on top of the restore (the Podman row of bench/containers.py:
the daemon's restore against Podman's import, then the command to the first answer).

Medians of 10, each a new process as a user's shell starts it: `import checkpointer.cli`,
`checkpointer --help`, `status` and `status --json` answered by a running daemon (no
workloads: the request costs the daemon ~nothing), and the interpreter alone (the floor).
Run: `python -m bench.cli_start` (root: it starts a daemon). Writes bench/results/cli_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import CLI, DISK, PY, ROOT, BenchDaemon
from bench.report import summarize

ROUNDS = 10


def seconds(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli_start.json")
    args = parser.parse_args()
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cli-", dir=DISK))
    try:
        with BenchDaemon(work) as d:
            config = ["--config", str(d.config)]
            cases = {
                "import checkpointer.cli.commands": [PY, "-c", "import checkpointer.cli.commands"],
                "checkpointer --help": [*CLI, "--help"],
                "checkpointer status (a daemon answers)": [*CLI, "status", *config],
                "checkpointer status --json": [*CLI, "status", "--json", *config],
                "python -c pass (the floor)": [PY, "-c", "pass"],
            }
            times: dict[str, list[float]] = {case: [] for case in cases}
            for _ in range(ROUNDS):  # interleaved: each case sees the same load
                for case, argv in cases.items():
                    times[case].append(seconds(argv))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load": os.getloadavg()[0],
        **{case: summarize(values) for case, values in times.items()},
    }
    width = max(map(len, cases))
    print(f"CLI start, medians of {ROUNDS} (load {results['load']:.1f})")
    for case, values in times.items():
        print(f"{case:<{width}}  {summarize(values)['median'] * 1000:5.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
