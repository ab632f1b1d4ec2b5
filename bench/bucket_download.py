"""Restore from the bucket: how fast checkpointer downloads a checkpoint, against a plain
parallel GET of the same objects from the same endpoint, alternated in one run.

- checkpointer: a second host's repository (its own state folder, empty cache; the storage
  stack the daemon builds, spool included) rebuilds the checkpoint into tmpfs: every pack and
  index GET, opened, decoded, written. Rate = bytes of those objects / wall time.
- plain GET: the same objects fetched with boto3 by as many threads as the repository's
  `storage.concurrency`, bodies read and dropped.

The image is synthetic (no CRIU needed): pages of random hex text like Redis values (each page
unique, compressing about 2:1). The endpoint is moto_server, measured twice:

- on loopback, as in the tests: no link at all, so both sides are bound by CPU, and moto (in
  Python) shares this machine's cores with the restore's decoding;
- behind a link of --link-mbit (default 1000; 0 skips it): moto in a network namespace of its
  own, reached over a veth whose server side a token-bucket filter holds to that rate, as a
  host's link to a remote endpoint would (needs root and iproute2; skipped, saying why,
  without them).

Run: `python -m bench.bucket_download --mb 512`. Prints a table, writes
bench/results/bucket_download.json.
"""

from __future__ import annotations

import argparse
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
from bench.shaped_link import available, shaped_link
from checkpointer.host.malloc import keep_heap_small
from checkpointer.repository.stack import open_repository
from storage.keys import index_key, manifest_key, pack_key
from tests.support.moto_server import Moto, s3_repository_config

ROUNDS = 3
TARGET = 0.8
LINK_MBIT = 1000  # a host's 1 GbE link to the endpoint
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
    def link_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--link-mbit", type=int, default=LINK_MBIT)

    args = bench_args(__doc__, 512, ROUNDS, "bucket_download.json", link_option)
    keep_heap_small()  # as the daemon, which restores, does
    DISK.mkdir(parents=True, exist_ok=True)
    SHM.mkdir(parents=True, exist_ok=True)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(k, v)
    work = Path(tempfile.mkdtemp(prefix="bench-bucket-", dir=DISK))
    out = Path(tempfile.mkdtemp(prefix="bench-bucket-", dir=SHM))
    try:
        image(work / "image", args.mb)
        results: dict[str, Any] = {
            "mb": args.mb,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "target": TARGET,
            "cpus": os.cpu_count(),
        }
        moto = Moto()
        try:
            results["loopback"] = measure(moto, work / "loopback", work / "image", out, args)
        finally:
            moto.stop()
        why_not = available() if args.link_mbit > 0 else "--link-mbit 0"
        if why_not:
            results["link"] = {"skipped": why_not}
        else:
            with shaped_link(args.link_mbit) as link:
                moto = Moto(host=link.server, netns=link.netns)
                try:
                    results["link"] = measure(moto, work / "link", work / "image", out, args)
                finally:
                    moto.stop()
                results["link"]["mbit"] = link.mbit
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    print(render(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def measure(moto: Moto, work: Path, image_dir: Path, out: Path, args: Any) -> dict[str, Any]:
    """Commit the image to a bucket on `moto`, then restore it on fresh hosts and GET it
    plainly, alternated, `args.rounds` times each."""
    ours: list[float] = []
    plain: list[float] = []
    # CPU seconds of each side: on two cores the endpoint (moto, in Python) and the restore's
    # decoding share them, which bounds the ratio on loopback more than any download does.
    cpu: dict[str, list[float]] = {
        "checkpointer": [],
        "moto serving checkpointer": [],
        "plain GET": [],
        "moto serving plain GET": [],
    }
    bucket = "bench-download"
    client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    key_file = work / "repository.key"
    first = s3_repository_config(work / "host-a", key_file, moto.url, bucket, "bench")
    repo, spool = open_repository(first)
    manifest = repo.commit("bench", image_dir)
    if spool is not None:
        if not spool.wait_uploaded(600):
            raise RuntimeError("the checkpoint did not reach the bucket")
        spool.close()
    keys = [manifest_key("bench", manifest.id)]
    home = manifest.pack_home
    keys += [k for p in manifest.packs for k in (pack_key(p, home), index_key(p, home))]
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
    ours_rate = total / summarize(ours)["median"]
    plain_rate = total / summarize(plain)["median"]
    return {
        "objects": len(keys),
        "object_bytes": total,
        "concurrency": concurrency,
        "checkpointer_seconds": summarize(ours),
        "plain_get_seconds": summarize(plain),
        "checkpointer_bytes_per_second": ours_rate,
        "plain_get_bytes_per_second": plain_rate,
        "ratio": ours_rate / plain_rate,
        "cpu_seconds": {k: summarize(v) for k, v in cpu.items()},
    }


def render(r: dict[str, Any]) -> str:
    mb = 1e6
    loop = r["loopback"]
    lines = [
        f"Restore from the bucket ({r['mb']} MB image, {loop['objects']} objects, "
        f"{loop['object_bytes'] / mb:.0f} MB stored, {loop['concurrency']} at once)",
        "",
        "| endpoint | checkpointer restore | plain parallel GET | ratio "
        f"(target >= {r['target']}) | verdict |",
        "|---|---|---|---|---|",
    ]
    rows = [("moto on loopback (CPU-bound, cores shared)", loop)]
    if "skipped" not in r["link"]:
        rows.append((f"moto behind a {r['link']['mbit']} Mbit/s link (tc tbf)", r["link"]))
    for name, m in rows:
        verdict = "met" if m["ratio"] >= r["target"] else "MISSED"
        lines.append(
            f"| {name} | {m['checkpointer_seconds']['median']:.2f} s, "
            f"{m['checkpointer_bytes_per_second'] / mb:.0f} MB/s | "
            f"{m['plain_get_seconds']['median']:.2f} s, "
            f"{m['plain_get_bytes_per_second'] / mb:.0f} MB/s | {m['ratio']:.2f} | {verdict} |"
        )
    if "skipped" in r["link"]:
        lines.append(f"| behind a link | skipped: {r['link']['skipped']} | | | |")
    lines.append("")
    for name, m in rows:
        lines.append(
            f"CPU seconds, {name} (of {r['cpus']} cores): "
            + ", ".join(f"{k} {v['median']:.2f}" for k, v in m["cpu_seconds"].items())
        )
    return "\n".join(lines)


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
