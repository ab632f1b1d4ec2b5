"""Rebuilding an image from the local repository, against the copies it competes with.

    .venv/bin/python -m bench.rebuild                 # 1 GiB image, 3 runs of each
    .venv/bin/python -m bench.rebuild --mb 256 --runs 5 --label after

After a reboot the kept image is gone and a restore waits for `Repository.materialize`; what it
can at best approach is a plain copy of the image folder (`cp`) and a plain read of the pack
files. This builds a ~1 GiB image folder shaped like a CRIU dump of a Redis heap (one big
`pages-1.img` of 4 KiB pages, runs of random pages alternating with runs of compressible ones,
half and half, plus a few small image files), commits it to a local repository (encrypted, the
default, and in clear), then times each of these, alternating them, `--runs` times:

- materialize: the checkpoint rebuilt into a fresh folder (as a restore does, into `--dest`);
- cp: `cp -r` of the image folder into a fresh folder on the same file system;
- read packs: every pack file of the repository read once, in one thread.

It also times the first commit, and a one-core BLAKE3 pass and BLAKE3 + zstd pass over the same
image (the yardsticks of the write path). Everything is warm in the page cache (the packs were
just written; a restore after a reboot reads them cold, which this does not measure). The
daemon's malloc tuning is applied, as in the daemon. Prints a table; writes
bench/results/rebuild.json, keeping the other labels' results there (so `--label before` and
`--label after` sit side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checkpointer.host.malloc import keep_heap_small  # noqa: E402
from storage import Repository  # noqa: E402
from storage.backends import LocalBlobStore  # noqa: E402
from storage.crypto import Sealed, new_master  # noqa: E402

PAGE = 4096
RESULTS = ROOT / "bench" / "results" / "rebuild.json"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
T = TypeVar("T")


def make_image(folder: Path, mb: int, random_share: float, seed: int = 15) -> dict[str, int]:
    """A CRIU-like image folder of `mb` MiB: pages-1.img made of runs of 1-64 pages, each run
    random (with probability `random_share`) or hex text (random bytes written as hex, as the
    benchmark's Redis values are: zstd halves it), and small files beside it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    pages = mb * 1024 * 1024 // PAGE
    counts = {"random_pages": 0, "compressible_pages": 0}
    with open(folder / "pages-1.img", "wb") as f:
        done = 0
        while done < pages:
            n = min(int(rng.integers(1, 65)), pages - done)
            if rng.random() < random_share:
                f.write(rng.bytes(n * PAGE))
                counts["random_pages"] += n
            else:
                nibbles = np.frombuffer(rng.bytes(n * PAGE // 2), dtype=np.uint8)
                text = np.empty(n * PAGE, dtype=np.uint8)
                text[0::2] = _HEX[nibbles >> 4]
                text[1::2] = _HEX[nibbles & 15]
                f.write(text.tobytes())
                counts["compressible_pages"] += n
            done += n
    small = {"core-1.img": 2_300, "mm-1.img": 9_000, "pagemap-1.img": 40_000, "pstree.img": 40}
    for name, size in small.items():
        (folder / name).write_bytes(rng.bytes(size // 2) + bytes(size - size // 2))
    return counts


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def read_files(paths: list[Path]) -> int:
    """Read every file once into one reused buffer: the floor of fetching the packs."""
    buf = bytearray(8 * 1024 * 1024)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def one_core_passes(folder: Path) -> dict[str, float]:
    """Bytes/s of a tight one-thread BLAKE3 pass, and BLAKE3 + zstd (level 1), over the 4 KiB
    chunks of the image: what the commit's throughput is compared with."""
    import blake3
    import zstandard

    out = {}
    c = zstandard.ZstdCompressor(level=1)
    for label, compress in (("hash_pass", False), ("hash_compress_pass", True)):
        total = 0
        t0 = time.perf_counter()
        for path in sorted(folder.iterdir()):
            with open(path, "rb") as f:
                while block := f.read(1 << 20):  # as bench/methods/yardstick.py reads
                    for off in range(0, len(block), PAGE):
                        chunk = block[off : off + PAGE]
                        blake3.blake3(chunk).digest()
                        if compress:
                            c.compress(chunk)
                    total += len(block)
        out[label] = total / (time.perf_counter() - t0)
    return out


def write_floor(folder: Path, work: Path) -> float:
    """Bytes/s of copying the image's bytes into a new file beside the repositories and
    fsyncing it: where a commit of random pages, stored raw, is bound by the disk."""
    target = work / "floor"
    buf = bytearray(1 << 20)
    total = 0
    t0 = time.perf_counter()
    with open(target, "wb", buffering=0) as out:
        for path in sorted(folder.iterdir()):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += out.write(memoryview(buf)[:n])
        os.fsync(out.fileno())
    seconds = time.perf_counter() - t0
    target.unlink()
    return total / seconds


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """Seconds `fn(*args)` took, and what it returned."""
    t0 = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t0, value


def cpu_timed(fn: Callable[..., T], *args: Any) -> tuple[float, float]:
    """Wall seconds of `fn(*args)` and the CPU seconds it used (this process's threads and
    its children, user and system): on a shared machine the wall time also shows what the
    neighbours took, the CPU time much less so."""
    before = os.times()
    wall, _ = timed(fn, *args)
    after = os.times()
    cpu = sum(after[:4]) - sum(before[:4])
    return wall, cpu


def record(
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    name: str,
    fn: Callable[..., object],
    *args: Any,
) -> None:
    wall, used = cpu_timed(fn, *args)
    times[name].append(wall)
    cpu[name].append(used)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    work, dest_root = Path(args.work), Path(args.dest)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest_root, ignore_errors=True)
    work.mkdir(parents=True)
    dest_root.mkdir(parents=True)
    image = work / "image"
    counts = make_image(image, args.mb, args.random_share)
    size = folder_bytes(image)
    print(f"image: {size / 1e6:.0f} MB in {image} ({counts})", flush=True)
    result: dict[str, Any] = {"image_bytes": size, **counts, "codecs": {}}
    result.update(one_core_passes(image))

    rand = work / "random"
    make_image(rand, max(64, args.mb // 4), 1.0, seed=16)
    result["random_image_bytes"] = folder_bytes(rand)
    result["random_hash_pass"] = one_core_passes(rand)["hash_pass"]
    result["random_write_fsync"] = write_floor(rand, work)

    for codec_name in ("encrypted", "clear"):
        repo = Repository(
            LocalBlobStore(work / f"repo-{codec_name}"),
            codec=Sealed(new_master()) if codec_name == "encrypted" else None,
        )
        commit_s, manifest = timed(repo.commit, "bench", image)
        rand_repo = Repository(
            LocalBlobStore(work / f"repo-{codec_name}-random"),
            codec=Sealed(new_master()) if codec_name == "encrypted" else None,
        )
        random_commit_s, _ = timed(rand_repo.commit, "bench", rand)
        packs = sorted((work / f"repo-{codec_name}" / "wpacks").rglob("*.pack"))
        pack_bytes = sum(p.stat().st_size for p in packs)
        times: dict[str, list[float]] = {"materialize": [], "cp": [], "read_packs": []}
        cpu: dict[str, list[float]] = {"materialize": [], "cp": [], "read_packs": []}
        read_files(packs)  # warm

        for run in range(args.runs):
            out = dest_root / f"out-{run}"
            record(times, cpu, "materialize", repo.materialize, "bench", manifest.id, out)
            assert (out / "pages-1.img").stat().st_size == (image / "pages-1.img").stat().st_size
            if run == 0:  # byte for byte, once
                subprocess.run(
                    ["cmp", str(image / "pages-1.img"), str(out / "pages-1.img")], check=True
                )
            shutil.rmtree(out)
            copy = dest_root / f"cp-{run}"
            record(times, cpu, "cp", subprocess.run, ["cp", "-r", str(image), str(copy)])
            shutil.rmtree(copy)
            record(times, cpu, "read_packs", read_files, packs)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["codecs"][codec_name] = {
            "commit_seconds": commit_s,
            "commit_bytes_per_second": size / commit_s,
            "random_commit_bytes_per_second": result["random_image_bytes"] / random_commit_s,
            "stored_bytes": pack_bytes,
            "packs": len(packs),
            **{k: summary(v) for k, v in times.items()},
            **{f"{k}_cpu": summary(v) for k, v in cpu.items()},
            "materialize_vs_cp": med["materialize"] / med["cp"],
            "materialize_vs_read_packs": med["materialize"] / med["read_packs"],
            "materialize_bytes_per_second": size / med["materialize"],
        }
        print(f"{codec_name}: done", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest_root, ignore_errors=True)
    return result


def table(label: str, r: dict[str, Any]) -> str:
    rows = [
        f"rebuild of a {r['image_bytes'] / 1e6:.0f} MB image ({label}); medians, warm page cache",
        "| repository | materialize | cp -r | read packs | materialize / cp | materialize / read"
        " | CPU s: materialize / cp | stored | commit (mixed) | commit (random) / one-core hash"
        " pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in r["codecs"].items():
        rows.append(
            f"| {name} | {c['materialize']['median']:.3f} s "
            f"({c['materialize_bytes_per_second'] / 1e6:.0f} MB/s) | {c['cp']['median']:.3f} s "
            f"| {c['read_packs']['median']:.3f} s | {c['materialize_vs_cp']:.2f} "
            f"| {c['materialize_vs_read_packs']:.2f} "
            f"| {c['materialize_cpu']['median']:.2f} / {c['cp_cpu']['median']:.2f} "
            f"| {c['stored_bytes'] / 1e6:.0f} MB "
            f"| {c['commit_bytes_per_second'] / 1e6:.0f} MB/s "
            f"| {c['random_commit_bytes_per_second'] / 1e6:.0f} MB/s "
            f"({c['random_commit_bytes_per_second'] / r['random_hash_pass']:.2f}) |"
        )
    rows.append(
        f"one-core passes over the mixed image: BLAKE3 {r['hash_pass'] / 1e6:.0f} MB/s, "
        f"BLAKE3 + zstd {r['hash_compress_pass'] / 1e6:.0f} MB/s; over the random image: "
        f"BLAKE3 {r['random_hash_pass'] / 1e6:.0f} MB/s, copied and fsynced beside the "
        f"repositories {r['random_write_fsync'] / 1e6:.0f} MB/s"
    )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=int, default=1024, help="image size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each (default 3)")
    p.add_argument("--random-share", type=float, default=0.5, help="share of random pages")
    p.add_argument("--work", default="/var/tmp/ckpt-bench-rebuild", help="image and repositories")
    p.add_argument("--dest", default="/dev/shm/ckpt-bench-rebuild", help="where images are rebuilt")
    p.add_argument("--label", default="latest", help="key of this run in rebuild.json")
    args = p.parse_args()
    keep_heap_small()
    result = bench(args)
    result.update(
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "work": args.work,
            "dest": args.dest,
            "runs": args.runs,
        }
    )
    print(table(args.label, result))
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old[args.label] = result
    RESULTS.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} [{args.label}]")


if __name__ == "__main__":
    main()
