"""One checkpointer checkpoint or restore in a process of its own, so that its peak RSS and CPU
seconds are its own: `python bench/worker.py JSON-ARGS`. Prints one JSON line of results.

It runs the production code path the daemon runs: the CRIU driver dumps into tmpfs, the
repository chunks, hashes, compresses, seals and stores (local folder, or spool → retries →
S3). The repository is opened as the daemon opens it (checkpointer/repository/key.py):
encrypted with `key_file` (written with a new repository), or in clear if `encryption` is
false.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

from checkpointer.config import Config
from checkpointer.criu import Criu, DumpOptions
from checkpointer.engine import kept_image
from checkpointer.host.malloc import keep_heap_small
from checkpointer.repository.key import open_codec
from storage import Repository
from storage.backends import BlobStore, LocalBlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.backends.spooled import SpooledBlobStore


def backend(args: dict[str, object]) -> tuple[BlobStore, BlobStore, SpooledBlobStore | None]:
    """The store checkpoints go to, the one holding the keys (S3: the bucket, as the daemon
    does), and the spool if any."""
    if args["backend"] == "local":
        local = LocalBlobStore(Path(str(args["repo"])))
        return local, local, None
    s3 = S3Settings(
        bucket=str(args["bucket"]),
        prefix="bench",
        endpoint_url=str(args["url"]),
        region="us-east-1",
        addressing_style="path",
        access_key_id="testing",
        secret_access_key="testing",
    )
    remote = RetryingBlobStore(S3BlobStore(s3))
    spool = SpooledBlobStore(remote, Path(str(args["cache"])), upload_concurrency=4)
    return spool, remote, spool


def config(args: dict[str, object]) -> Config:
    """What the daemon's config would say of encryption (the rest is not read here)."""
    return Config.model_validate(
        {
            "state_dir": str(args["scratch"]),
            "storage": {
                "encryption": bool(args.get("encryption", True)),
                "key_file": str(args["key_file"]),
            },
        }
    )


def main() -> None:
    keep_heap_small()  # as the daemon does
    args = json.loads(sys.argv[1])
    store, keys, spool = backend(args)
    # Opened once at the daemon's start: not part of any timing below.
    repo = Repository(store, concurrency=4, codec=open_codec(config(args), keys, "bench").codec)
    criu = Criu("criu", Path(str(args["scratch"])) / "failed-logs")
    out: dict[str, object] = {}
    t0 = time.monotonic()
    if args["op"] == "checkpoint":
        images = Path(str(args["scratch"])) / f"images-{time.time_ns()}"
        images.mkdir(parents=True)
        stats = criu.dump(int(str(args["pid"])), images, DumpOptions(), "bench")
        t_dump = time.monotonic()
        m = repo.commit(str(args["workload"]), images, {})
        t_commit = time.monotonic()
        if spool is not None:
            spool.wait_uploaded(3600)
        t_durable = time.monotonic()
        if args.get("keep"):  # what the daemon does with keep_latest_image
            shutil.rmtree(str(args["keep"]), ignore_errors=True)
            images.rename(str(args["keep"]))
            Path(str(args["keep"]) + ".stamp").write_text(
                json.dumps(kept_image.stamp(Path(str(args["keep"]))))
            )
        else:
            shutil.rmtree(images)
        out.update(
            id=m.id,
            frozen=stats.frozen_time,
            dump_wall=t_dump - t0,
            commit=t_commit - t_dump,
            durable=t_durable - t0,
            image=m.size_bytes,
            new_bytes=m.new_bytes,
            new_chunks=m.new_chunks,
            encrypted=repo.codec.encrypted,
        )
    else:  # restore: materialise (verified), then CRIU
        hot = Path(str(args["hot"])) if args.get("hot") else None
        recorded = json.loads(Path(f"{hot}.stamp").read_text()) if hot else {}
        seed = None
        if hot and kept_image.unchanged(hot, recorded):
            seed = (str(args["hot_id"]), hot)  # the kept image, checked against its stamps
        if seed and seed[0] == args["id"]:
            images, kept = seed[1], True  # the kept checkpoint itself
        else:  # rebuilt; what it shares with the kept checkpoint is copied from it
            images, kept = Path(str(args["scratch"])) / f"restore-{time.time_ns()}", False
            repo.materialize(str(args["workload"]), str(args["id"]), images, seed=seed)
        t_fetch = time.monotonic()
        pid, rstats = criu.restore(images, DumpOptions(), "bench")
        if not kept:
            shutil.rmtree(images)
        out["kept_image"] = kept
        out["encrypted"] = repo.codec.encrypted
        out.update(pid=pid, fetch=t_fetch - t0, criu_restore=rstats.restore_time)
    out["wall"] = time.monotonic() - t0
    if spool is not None:
        spool.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    hwm = next(
        ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")
    )
    out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    out["cpu_seconds"] = ru.ru_utime + ru.ru_stime
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
