"""Restore from the bucket: how fast checkpointer downloads a checkpoint, against a plain
parallel GET of the same objects from the same endpoint, alternated in one run.

- checkpointer: a second host's repository (its own state folder, empty cache; the storage
  stack the daemon builds, spool included) rebuilds the checkpoint into tmpfs: every pack and
  index GET, opened, decoded, written. Rate = bytes of those objects / wall time.
- plain GET: the same objects fetched with boto3 by as many threads as the repository's
  `storage.concurrency`, bodies read and dropped.

The image is synthetic (no CRIU needed): pages of random hex text like Redis values (each page
unique, compressing about 2:1). The endpoint is moto_server on loopback, as in the tests.

Run: `python -m bench.bucket_download --mb 512`. Prints a table, writes
bench/results/bucket_download.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3

from bench.harness import DISK, SHM, bench_args
from bench.report import summarize
from checkpointer.daemon.storage_setup import open_repository
from checkpointer.malloc_tuning import keep_heap_small
from storage.keys import index_key, manifest_key, pack_key
from tests.support.moto_server import Moto, s3_repository_config

ROUNDS = 3
TARGET = 0.8
PAGE = 4096


def image(folder: Path, mb: int) -> None:
    folder.mkdir(parents=True, mode=0o700)
    pages = mb * 1024 * 1024 // PAGE
    with open(folder / "pages-1.img", "wb") as f:
        for start in range(0, pages, 256):
            block = [os.urandom(PAGE // 2).hex().encode() for _ in range(min(256, pages - start))]
            f.write(b"".join(block))
    (folder / "core-1.img").write_bytes(os.urandom(3000))


def main() -> None:
    args = bench_args(__doc__, 512, ROUNDS, "bucket_download.json")
    keep_heap_small()  # as the daemon, which restores, does
    DISK.mkdir(parents=True, exist_ok=True)
    SHM.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-bucket-", dir=DISK))
    out = Path(tempfile.mkdtemp(prefix="bench-bucket-", dir=SHM))
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(k, v)
    moto = Moto()
    ours: list[float] = []
    plain: list[float] = []
    # CPU seconds of each side: on two cores the endpoint (moto, in Python) and the restore's
    # decoding share them, which bounds the ratio more than any download does.
    cpu: dict[str, list[float]] = {
        "checkpointer": [],
        "moto serving checkpointer": [],
        "plain GET": [],
        "moto serving plain GET": [],
    }
    try:
        bucket = "bench-download"
        client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        key_file = work / "repository.key"
        first = s3_repository_config(work / "host-a", key_file, moto.url, bucket, "bench")
        repo, spool = open_repository(first)
        image(work / "image", args.mb)
        manifest = repo.commit("bench", work / "image")
        if spool is not None:
            if not spool.wait_uploaded(600):
                raise RuntimeError("the checkpoint did not reach the bucket")
            spool.close()
        keys = [manifest_key("bench", manifest.id)]
        keys += [k for p in manifest.packs for k in (pack_key(p), index_key(p))]
        keys = [f"bench/{k}" for k in keys]
        total = sum(client.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in keys)
        concurrency = first.storage.concurrency
        for n in range(args.rounds):
            # Another host each time: its own state folder, nothing cached.
            other = s3_repository_config(work / f"host-b{n}", key_file, moto.url, bucket, "bench")
            repo_b, spool_b = open_repository(other)
            folder = out / f"restore-{n}"
            t0, c0, m0 = time.monotonic(), time.process_time(), _cpu(moto.proc.pid)
            repo_b.materialize("bench", manifest.id, folder)
            ours.append(time.monotonic() - t0)
            cpu["checkpointer"].append(time.process_time() - c0)
            cpu["moto serving checkpointer"].append(_cpu(moto.proc.pid) - m0)
            if spool_b is not None:
                spool_b.close()
            shutil.rmtree(folder)
            shutil.rmtree(work / f"host-b{n}")
            t0, c0, m0 = time.monotonic(), time.process_time(), _cpu(moto.proc.pid)
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(),
                              keys))  # fmt: skip
            plain.append(time.monotonic() - t0)
            cpu["plain GET"].append(time.process_time() - c0)
            cpu["moto serving plain GET"].append(_cpu(moto.proc.pid) - m0)
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    ours_rate = total / summarize(ours)["median"]
    plain_rate = total / summarize(plain)["median"]
    results: dict[str, Any] = {
        "mb": args.mb,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "objects": len(keys),
        "object_bytes": total,
        "concurrency": concurrency,
        "checkpointer_seconds": summarize(ours),
        "plain_get_seconds": summarize(plain),
        "checkpointer_bytes_per_second": ours_rate,
        "plain_get_bytes_per_second": plain_rate,
        "ratio": ours_rate / plain_rate,
        "target": TARGET,
        "cpu_seconds": {k: summarize(v) for k, v in cpu.items()},
        "cpus": os.cpu_count(),
    }
    print(render(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def render(r: dict[str, Any]) -> str:
    mb = 1e6
    verdict = "met" if r["ratio"] >= r["target"] else "MISSED"
    return "\n".join(
        [
            f"Restore from the bucket ({r['mb']} MB image, {r['objects']} objects, "
            f"{r['object_bytes'] / mb:.0f} MB stored, {r['concurrency']} at once)",
            "",
            "| download | seconds | MB/s |",
            "|---|---|---|",
            f"| checkpointer restore | {r['checkpointer_seconds']['median']:.2f} | "
            f"{r['checkpointer_bytes_per_second'] / mb:.0f} |",
            f"| plain parallel GET | {r['plain_get_seconds']['median']:.2f} | "
            f"{r['plain_get_bytes_per_second'] / mb:.0f} |",
            f"| ratio (target >= {r['target']}) | {r['ratio']:.2f} | {verdict} |",
            "",
            f"CPU seconds (of {r['cpus']} cores): "
            + ", ".join(f"{k} {v['median']:.2f}" for k, v in r["cpu_seconds"].items()),
        ]
    )


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
