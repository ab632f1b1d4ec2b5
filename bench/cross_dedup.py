"""What dedup across workloads is worth: the number docs/fleet.md (R3) asks for before the
chunk index and GC are scoped to one workload.

The bench's workloads (two Redis with different data, two Redis with the same data, two Python
processes holding random bytearrays, two counter servers) are dumped once each by CRIU, then
committed into one shared repository in turn (dedup across every workload, as today) and each
into a repository of its own (dedup within the workload only, as R3 would do). The difference
in bytes newly stored is what cross-workload dedup saves.

    python -m bench.cross_dedup [--mb 100]   # a table; bench/results/cross_dedup.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.harness import PY, ROOT, kill, launch, raw_dump, reap
from bench.workloads import PyArray, Redis
from checkpointer.criu import Criu
from storage import Repository
from storage.backends import LocalBlobStore
from tests.support.net import free_port
from tests.support.redis_server import redis_client, redis_command

RESULTS = ROOT / "bench" / "results" / "cross_dedup.json"
COUNTER = ROOT / "examples" / "counter_server.py"


def same_data_redis(mb: int) -> tuple[int, int]:
    """Two Redis holding the very same keys and values (a replica, a second shard's copy)."""
    pids = []
    values = [bytes([i % 251]) * 500 for i in range(mb * 1024 * 1024 // 1200)]
    for _ in range(2):
        port = free_port()
        pids.append(launch(redis_command(port)))
        client = redis_client(port, socket_timeout=60)
        pipe = client.pipeline(transaction=False)
        for i, v in enumerate(values):
            pipe.set(f"key:{i}", v.hex())
        pipe.execute()
        client.close()
    return pids[0], pids[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100, help="memory of each data workload")
    args = ap.parse_args()
    criu = Criu("criu", Path(tempfile.gettempdir()) / "criu-failed")
    work = Path(tempfile.mkdtemp(prefix="ckpt-cross-dedup-", dir="/var/tmp"))
    pids: list[tuple[str, int]] = []
    try:
        a, b = Redis(args.mb), Redis(args.mb)
        pids += [("redis-a (own data)", a.pid), ("redis-b (own data)", b.pid)]
        s1, s2 = same_data_redis(args.mb)
        pids += [("redis-c (same data)", s1), ("redis-d (same data)", s2)]
        p1, p2 = PyArray(args.mb), PyArray(args.mb)
        pids += [("python-a (bytearray)", p1.pid), ("python-b (bytearray)", p2.pid)]
        for name in ("counter-a", "counter-b"):
            pids.append((name, launch([PY, str(COUNTER), str(free_port())])))
        images = [(name, raw_dump(criu, pid, work / "images")[2]) for name, pid in pids]

        shared = Repository(LocalBlobStore(work / "shared"))
        rows = []
        for i, (name, folder) in enumerate(images):
            together = shared.commit(f"w{i}", folder)
            alone = Repository(LocalBlobStore(work / f"alone-{i}")).commit(f"w{i}", folder)
            rows.append(
                {
                    "workload": name,
                    "image_bytes": together.size_bytes,
                    "stored_alone": alone.new_bytes,
                    "stored_shared": together.new_bytes,
                }
            )
    finally:
        for _, pid in pids:
            kill(pid)
        reap()
        shutil.rmtree(work, ignore_errors=True)

    total_alone = sum(r["stored_alone"] for r in rows)
    total_shared = sum(r["stored_shared"] for r in rows)
    print(f"{'workload':24} {'image MB':>9} {'alone MB':>9} {'shared MB':>10} {'saved':>6}")
    for r in rows:
        saved = 1 - r["stored_shared"] / r["stored_alone"] if r["stored_alone"] else 0.0
        print(
            f"{r['workload']:24} {r['image_bytes'] / 1e6:9.1f} {r['stored_alone'] / 1e6:9.1f} "
            f"{r['stored_shared'] / 1e6:10.1f} {saved:6.1%}"
        )
    saved_total = 1 - total_shared / total_alone
    print(
        f"{'all':24} {'':9} {total_alone / 1e6:9.1f} {total_shared / 1e6:10.1f} {saved_total:6.1%}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"mb": args.mb, "rows": rows, "saved_share": saved_total}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
