"""A container checkpointed and restored: Podman's own export/import next to the service, in
one run, on the same 300 MB container (the counter holding MB of random bytes, runc).

- podman export: `podman container checkpoint --leave-running --export F` (uncompressed, and
  with zstd, Podman's default), then `podman container restore --import F` of a removed
  container (the `podman rm` not timed). Every checkpoint is a whole export: what a user who
  keeps them stores.
- checkpointer: the daemon on a local repository (encrypted, the default), `register --podman`,
  checkpoints taken by hand; bytes stored are the new bytes of each (steady: the container
  changed nothing in between, the dedup's best case, and once with a page per MB touched);
  restores from the kept image and, with it dropped (after a reboot), rebuilt from the
  repository. Each of the service's restores comes right after one of Podman's own imports
  (the two containers run side by side), so both see the same load.

Pause is CRIU's frozen time (from the dump's stats-dump, whoever ran CRIU); restore time is
from the command to the first answered request. Run: `python -m bench.containers --mb 300`
(root; `make containers` first). Prints a table, writes bench/results/containers.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DISK, ROOT, BenchDaemon
from bench.report import summarize
from checkpointer.criu.images.stats import read_dump_stats
from tests.support.containers import ask, podman, podman_container, podman_pid
from tests.support.net import free_port

ROUNDS = 5


def frozen_time(export: Path, work: Path) -> float:
    with tarfile.open(export) as tar:
        member = tar.getmember("stats-dump")
        tar.extract(member, work, filter="data")
    return read_dump_stats(work).frozen_time


def answered_after(t0: float, name: str, port: int) -> float:
    ask(podman_pid(name, timeout=120), port, timeout=120)
    return time.monotonic() - t0


def podman_export(name: str, port: int, work: Path) -> tuple[dict[str, Any], list[Path]]:
    """Podman's own checkpoints: their figures, and the exports."""
    pauses, seconds, sizes, zsizes, exports = [], [], [], [], []
    for i in range(ROUNDS):
        export = work / f"export-{i}.tar"
        t0 = time.monotonic()
        podman("container", "checkpoint", "--leave-running", "--export", str(export),
               "--compress", "none", name)  # fmt: skip
        seconds.append(time.monotonic() - t0)
        pauses.append(frozen_time(export, work / f"stats-{i}"))
        sizes.append(export.stat().st_size)
        exports.append(export)
        zexport = work / f"export-{i}.tar.zst"
        podman("container", "checkpoint", "--leave-running", "--export", str(zexport), name)
        zsizes.append(zexport.stat().st_size)
        zexport.unlink()
    return {
        "pause": summarize(pauses),
        "checkpoint_seconds": summarize(seconds),
        "stored_bytes_each": summarize([float(s) for s in sizes]),
        "stored_bytes_each_zstd": summarize([float(s) for s in zsizes]),
    }, exports


def podman_import(name: str, port: int, export: Path) -> float:
    podman("rm", "--force", "--time", "0", name)  # as a user of exports must, not timed
    t0 = time.monotonic()
    podman("container", "restore", "--import", str(export))
    return answered_after(t0, name, port)


def service(name: str, port: int, work: Path, own: tuple[str, int, list[Path]]) -> dict[str, Any]:
    """The service's checkpoints and restores; each restore right after one of Podman's own
    imports (`own`: its container, port and exports), so that both see the same load."""
    with BenchDaemon(work) as d:
        call = d.call
        call("register", "web", "--podman", name, "--no-auto-restore")
        reports = [call("checkpoint", "web") for _ in range(ROUNDS)]
        ask(podman_pid(name), port, "/touch")  # one page of every MB of the ballast changes
        touched = call("checkpoint", "web")
        cli = []  # a request that does nothing: the CLI's own share of a restore's time
        for _ in range(ROUNDS):
            t0 = time.monotonic()
            d.pid("web")
            cli.append(time.monotonic() - t0)
        restores: dict[str, list[float]] = {"kept image": [], "repository": [], "podman": []}
        engine: dict[str, list[float]] = {"kept image": [], "repository": []}
        for source in ("kept image", "repository"):
            for i in range(ROUNDS):
                restores["podman"].append(podman_import(own[0], own[1], own[2][i]))
                if source == "repository":  # no kept image, no disk image
                    d.drop_images()
                podman("kill", name)
                podman("wait", name, check=False)
                t0 = time.monotonic()
                r = call("restore", "web")
                restores[source].append(answered_after(t0, name, port))
                assert r["source"] == source, r
                engine[source].append(r["duration_seconds"])
                call("checkpoint", "web")  # the next round restores this one
        return {
            "pause": summarize([r["dump_stats"]["frozen_time"] for r in reports]),
            "checkpoint_seconds": summarize([r["duration_seconds"] for r in reports]),
            "first_checkpoint_new_bytes": reports[0]["new_bytes"],
            "stored_bytes_each": summarize([float(r["new_bytes"]) for r in reports[1:]]),
            "image_bytes": reports[0]["size_bytes"],
            "touched_new_bytes": touched["new_bytes"],
            "restore_seconds_kept": summarize(restores["kept image"]),
            "restore_seconds_repository": summarize(restores["repository"]),
            # The daemon's own time (its report), without the CLI and the first answer.
            "restore_engine_seconds_kept": summarize(engine["kept image"]),
            "restore_engine_seconds_repository": summarize(engine["repository"]),
            "podman_restore_seconds": summarize(restores["podman"]),
            "cli_status_seconds": summarize(cli),
        }


def table(results: dict[str, Any]) -> str:
    p, c = results["podman export"], results["checkpointer"]
    mb = 1024 * 1024

    def med(d: dict[str, Any], k: str) -> float:
        return float(d[k]["median"])

    rows = [
        ("pause (CRIU frozen time)", f"{med(p, 'pause'):.3f} s", f"{med(c, 'pause'):.3f} s"),
        ("checkpoint, total", f"{med(p, 'checkpoint_seconds'):.2f} s",
         f"{med(c, 'checkpoint_seconds'):.2f} s"),
        ("stored per checkpoint, steady", f"{med(p, 'stored_bytes_each') / mb:.1f} MB "
         f"({med(p, 'stored_bytes_each_zstd') / mb:.1f} zstd)",
         f"{med(c, 'stored_bytes_each') / mb:.3f} MB"),
        ("stored, first checkpoint", "same", f"{c['first_checkpoint_new_bytes'] / mb:.1f} MB"),
        ("stored, one page per MB changed", "same", f"{c['touched_new_bytes'] / mb:.3f} MB"),
        ("restore to first answer", f"{med(p, 'restore_seconds'):.2f} s",
         f"{med(c, 'restore_seconds_kept'):.2f} s kept image, "
         f"{med(c, 'restore_seconds_repository'):.2f} s from the repository"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    title = f"Podman container, {results['mb']} MB of random bytes in memory (medians of {ROUNDS})"
    lines = [title, "", f"{'':<{width}}  {'podman export/import':<26}  checkpointer"]
    lines += [f"{a:<{width}}  {b:<26}  {c_}" for a, b, c_ in rows]
    lines += [
        f"{'  in the daemon (its report)':<{width}}  {'':<26}  "
        f"{med(c, 'restore_engine_seconds_kept'):.2f} s kept image, "
        f"{med(c, 'restore_engine_seconds_repository'):.2f} s from the repository"
    ]
    lines += [f"{'  the CLI alone (`status`)':<{width}}  {'':<26}  "
              f"{med(c, 'cli_status_seconds'):.2f} s"]  # fmt: skip
    kept = med(c, "restore_seconds_kept") / med(p, "restore_seconds")
    ratio = med(c, "restore_seconds_repository") / med(p, "restore_seconds")
    daemon = med(c, "restore_engine_seconds_kept") / med(p, "restore_seconds")
    lines += ["", f"restore from the kept image / podman import: {kept:.2f}x"]
    lines += [f"  the daemon's own time of it (no CLI, no first answer) / podman import: "
              f"{daemon:.2f}x"]  # fmt: skip
    lines += [f"restore from the repository / podman import: {ratio:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "containers.json")
    args = parser.parse_args()
    subprocess.run(["bash", str(ROOT / "scripts" / "build-test-rootfs.sh")], check=True)
    results: dict[str, Any] = {"mb": args.mb, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    DISK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-containers-", dir=DISK))
    try:
        own, ours = ("bench-ctr-podman", free_port()), ("bench-ctr-checkpointer", free_port())
        with podman_container(*own, args.mb), podman_container(*ours, args.mb):
            for name, port in (own, ours):
                ask(podman_pid(name), port, timeout=60)
            for sub in ("podman", "checkpointer"):
                (work / sub).mkdir()
            results["podman export"], exports = podman_export(*own, work / "podman")
            results["checkpointer"] = service(*ours, work / "checkpointer", (*own, exports))
            results["podman export"]["restore_seconds"] = results["checkpointer"].pop(
                "podman_restore_seconds"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
