"""Migration downtime: a Redis moved from host A to host B, three ways, in one run.

- checkpointer: two fleet daemons on one bucket (moto_server on loopback), `migrate redis
  --to b` after 1% of the keys changed since the last scheduled checkpoint; downtime is from
  the command (the freeze is its first step) to the first PING answered by the tree restored
  on B. B's cache is empty: what it restores comes from the bucket.
- raw CRIU: `criu dump` (the tree stops), the image folder copied to another folder, `criu
  restore` from the copy: the floor, with no storage in between.
- the seeds' way: dump to disk, tar + zstd, copy the tarball, unpack, restore.

Run: `python -m bench.migration --mb 300` (root). Prints a table, writes
bench/results/migration.json. moto_server is a Python S3 server on the same two cores (about
30 MB/s): the checkpointer figure is bound by it, not by S3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import CLI, DISK, ROOT, clean_env, kill, launch, reap
from checkpointer.criu import Criu, DumpOptions
from checkpointer.engine import tmpfs_scratch_root
from tests.support.moto_server import S3_ENV, Moto
from tests.support.net import free_port
from tests.support.redis_server import redis_client, redis_command

FAST_LEASES = ", lease_ttl: 6s, renew_every: 1s, clock_skew: 1s"
FLEET = """state_dir: {state}
metrics: {{enabled: false}}
host: {{id: {host}}}
fleet: {{enabled: true{leases}}}
storage:
  backend: s3
  key_file: {key}
  gc_every: 1h
  s3: {{bucket: {bucket}, prefix: mig, endpoint_url: "{url}", region: us-east-1,
        addressing_style: path}}
"""


def fill(port: int, mb: int) -> int:
    client = redis_client(port, socket_timeout=60)
    keys = mb * 1024 * 1024 // 1200
    for start in range(0, keys, 20_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 20_000, keys)):
            pipe.set(f"key:{i}", os.urandom(500).hex())
        pipe.execute()
    client.close()
    return keys


def mutate(port: int, keys: int) -> None:
    client = redis_client(port, socket_timeout=60)
    pipe = client.pipeline(transaction=False)
    for i in range(7, keys, 100):
        pipe.set(f"key:{i}", os.urandom(500).hex())
    pipe.execute()
    client.close()


def first_answer(port: int, keys: int, timeout: float = 300) -> float:
    """When (Unix time) the Redis on `port` first answers with all its keys."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client = redis_client(port, timeout=0.05, socket_timeout=5)
            n = int(client.dbsize())
            client.close()
            if n == keys:
                return time.time()
        except Exception:
            time.sleep(0.01)
    raise RuntimeError(f"redis on {port} never answered with its {keys} keys")


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*CLI, args[0], "--config", str(config), *args[1:]],
        capture_output=True, text=True, cwd=ROOT, env=clean_env(**S3_ENV), timeout=600,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr}")
    return r


def daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*CLI, "daemon", "--config", str(config)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT,
        env=clean_env(**S3_ENV), start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while subprocess.run(
        [*CLI, "status", "--config", str(config)], capture_output=True, cwd=ROOT, check=False
    ).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def checkpointer_migration(mb: int, work: Path) -> dict[str, float]:
    moto = Moto()
    bucket = f"mig-{os.getpid()}"
    moto.create_bucket(bucket)
    key = work / "repository.key"
    configs, procs = {}, []
    try:
        for host in ("a", "b"):
            configs[host] = work / f"{host}.yaml"
            configs[host].write_text(
                FLEET.format(
                    state=work / host, host=host, key=key, bucket=bucket, url=moto.url,
                    leases=FAST_LEASES,
                )
            )  # fmt: skip
            procs.append(daemon(configs[host], work / f"{host}.log"))
        port = free_port()
        cli(configs["a"], "run", "redis", "--", *redis_command(port))
        keys = fill(port, mb)
        cli(configs["a"], "checkpoint", "redis")
        mutate(port, keys)  # 1% changed since the last checkpoint
        t0 = time.time()
        r = json.loads(cli(configs["a"], "migrate", "redis", "--to", "b", "--json").stdout)
        t_handed = time.time()
        t1 = first_answer(port, keys)
        st = json.loads(cli(configs["b"], "status", "redis", "--json").stdout)[0]
        assert st["state"] == "running" and st["restores"][-1]["reason"] == "migration", st
        return {
            # from the freeze on A (the daemon's clock: the same host here) to B answering
            "downtime_seconds": t1 - float(r["frozen_at"]),
            "command_to_answer_seconds": t1 - t0,  # with the CLI's own start-up
            "on_source_seconds": float(r["duration_seconds"]),  # dump, upload, hand-over
            "cli_seconds": t_handed - t0,
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
        for host in configs:
            registry = work / host / "workloads.json"
            if registry.exists():
                for w in json.loads(registry.read_text())["workloads"]:
                    if w["pid"]:
                        kill(int(w["pid"]))
        reap()
        moto.stop()
        for host in configs:  # the daemons' scratch in /dev/shm holds images (RAM)
            shutil.rmtree(tmpfs_scratch_root(work / host), ignore_errors=True)


def small_migration(work: Path) -> dict[str, float]:
    """`migrate` of a small process (the counter server) with the default lease settings
    (renewals every 10 s): the command's own time, from the CLI's start to its return."""
    moto = Moto()
    bucket = f"mig-small-{os.getpid()}"
    moto.create_bucket(bucket)
    key = work / "small.key"
    configs, procs, pid = {}, [], 0
    try:
        for host in ("sa", "sb"):
            configs[host] = work / f"{host}.yaml"
            configs[host].write_text(
                FLEET.format(
                    state=work / host, host=host, key=key, bucket=bucket, url=moto.url, leases=""
                )
            )
            procs.append(daemon(configs[host], work / f"{host}.log"))
        port = free_port()
        counter = ROOT / "examples" / "counter_server.py"
        cli(configs["sa"], "run", "counter", "--", sys.executable, str(counter), str(port))
        cli(configs["sa"], "checkpoint", "counter")
        t0 = time.time()
        cli(configs["sa"], "migrate", "counter", "--to", "sb")
        command = time.time() - t0
        deadline = time.monotonic() + 60
        while not pid and time.monotonic() < deadline:  # restored on B: its pid, to end it
            st = json.loads(cli(configs["sb"], "status", "counter", "--json").stdout)[0]
            pid = int(st["pid"] or 0) if st["state"] == "running" else 0
            time.sleep(0.2)
        return {"migrate_command_seconds": command}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
        if pid:
            kill(pid)
        reap()
        moto.stop()
        for host in configs:
            shutil.rmtree(tmpfs_scratch_root(work / host), ignore_errors=True)


def raw_migration(mb: int, work: Path, seeds: bool) -> dict[str, float]:
    criu = Criu("criu", work / "criu-logs", 600)
    port = free_port()
    pid = launch(redis_command(port))
    keys = fill(port, mb)
    mutate(port, keys)
    src = DISK / f"mig-src-{time.time_ns()}"
    dst = DISK / f"mig-dst-{time.time_ns()}"
    src.mkdir(parents=True)
    t0 = time.time()
    criu.dump(pid, src, DumpOptions(), "bench-migration", final=True)  # the tree stops
    kill(pid)  # its port must be free for the restore
    reap()
    if seeds:
        tarball = DISK / f"mig-{time.time_ns()}.tar.zst"
        subprocess.run(["tar", "-I", "zstd -1 -T0", "-cf", str(tarball), "-C", str(src), "."],
                       check=True)  # fmt: skip
        copy = tarball.with_suffix(".copy")
        shutil.copy(tarball, copy)
        dst.mkdir()
        subprocess.run(["tar", "-I", "zstd", "-xf", str(copy), "-C", str(dst)], check=True)
        tarball.unlink()
        copy.unlink()
    else:
        shutil.copytree(src, dst)
    restored, _ = criu.restore(dst, DumpOptions(), "bench-migration")
    t1 = first_answer(port, keys)
    kill(restored)
    reap()
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    return {"downtime_seconds": t1 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="Redis size (default 300)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "migration.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark runs CRIU: run it as root")
    os.makedirs(DISK, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-mig-") as tmp:
        work = Path(tmp)
        raw = raw_migration(args.mb, work, seeds=False)
        seeds = raw_migration(args.mb, work, seeds=True)
        ours = checkpointer_migration(args.mb, work)
        small = small_migration(work)
    result: dict[str, Any] = {
        "redis_mb": args.mb,
        "raw_criu": raw,
        "seeds": seeds,
        "checkpointer": ours,
        "ratio_vs_raw": ours["downtime_seconds"] / raw["downtime_seconds"],
        "ratio_seeds_vs_raw": seeds["downtime_seconds"] / raw["downtime_seconds"],
        "small_process": small,
        "target": "checkpointer <= 1.3x raw CRIU and below the seeds' way",
    }
    result["met"] = (
        result["ratio_vs_raw"] <= 1.3 and ours["downtime_seconds"] < seeds["downtime_seconds"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"migration of Redis {args.mb} MB (1% of keys changed since the last checkpoint)")
    print(f"{'method':<40} {'downtime s':>10} {'x raw':>7}")
    for label, fig in (
        ("raw CRIU: dump + copy + restore", raw),
        ("seeds: dump + tar/zstd + copy + restore", seeds),
        ("checkpointer migrate (through moto)", ours),
    ):
        ratio = fig["downtime_seconds"] / raw["downtime_seconds"]
        print(f"{label:<40} {fig['downtime_seconds']:>10.2f} {ratio:>7.2f}")
    print(f"target {result['target']}: {'met' if result['met'] else 'MISSED'}")
    print(
        f"migrate of a small process, default leases (renew every 10 s): "
        f"{small['migrate_command_seconds']:.2f} s for the command (target <= 3 s)"
    )


if __name__ == "__main__":
    main()
