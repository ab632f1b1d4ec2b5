"""The daemon never loses a restore to a race, a planted folder or a transient outage."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpointer.engine import tmpfs_scratch_root
from checkpointer.engine.registry import Registry, RegistryUnreadable
from checkpointer.engine.workload import Workload, WorkloadKind
from tests.support import (
    COUNTER,
    S3_ENV,
    Daemon,
    Moto,
    free_port,
    http_get,
    kill_tree,
    s3_config,
)
from tests.support.daemon import refused_start
from tests.support.prometheus import ALERTS, daemon_and_prometheus


def test_registry_saved_from_many_threads_is_always_whole(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "workloads.json")
    for i in range(20):
        registry.add(Workload(name=f"w{i}", kind=WorkloadKind.ADOPTED, pid=1000 + i))
    errors: list[BaseException] = []
    stop = threading.Event()

    def save() -> None:
        try:
            # 4 x 25 saves (serialized, two fsyncs each, against a reader spinning on the GIL)
            # took ~35 s here; 4 x 100 took 144 s of the suite and found nothing more.
            for _ in range(25):
                registry.save()
        except BaseException as e:
            errors.append(e)

    def read() -> None:
        while not stop.is_set():
            try:
                doc = json.loads((tmp_path / "workloads.json").read_bytes())
                assert len(doc["workloads"]) == 20
            except BaseException as e:
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    savers = [threading.Thread(target=save) for _ in range(4)]
    for t in savers:
        t.start()
    for t in savers:
        t.join()
    stop.set()
    reader.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".workloads-")] == []
    assert len(Registry(tmp_path / "workloads.json").load()) == 20


def test_a_damaged_registry_falls_back_to_the_copy_before_or_refuses(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "workloads.json")
    registry.add(Workload(name="a", kind=WorkloadKind.ADOPTED, pid=1000))
    registry.add(Workload(name="b", kind=WorkloadKind.ADOPTED, pid=1001))
    (tmp_path / "workloads.json").write_text('{"workloads": [')  # torn on disk
    assert [w.name for w in Registry(tmp_path / "workloads.json").load()] == ["a"]
    (tmp_path / "workloads.json.prev").write_text("garbage")
    with pytest.raises(RegistryUnreadable, match=r"move .* aside"):
        Registry(tmp_path / "workloads.json").load()


@pytest.mark.parametrize("plant", ["directory", "symlink"])
def test_scratch_folder_planted_by_an_unprivileged_user_is_never_used(
    workdir: Path, plant: str
) -> None:
    d = Daemon(workdir)
    root = tmpfs_scratch_root(d.state)
    shutil.rmtree(root, ignore_errors=True)
    theirs = Path("/dev/shm") / f"attacker-{os.getpid()}"
    # /dev/shm is empty after a boot: user `nobody` creates the daemon's folder name first.
    if plant == "directory":
        cmd = ["mkdir", "-m", "0777", str(root)]
    else:
        cmd = ["sh", "-c", 'mkdir -m 0777 "$1" && ln -s "$1" "$2"', "sh", str(theirs), str(root)]
    subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd], check=True
    )
    try:
        assert root.is_symlink() or root.stat().st_uid == 65534
        d.start()
        port = free_port()
        d.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        http_get(port)
        d.checkpoint("web")
        kill_tree(d.pid("web"))
        d.cli("restore", "web")
        assert http_get(port) == "2"
        target = theirs if plant == "symlink" else root
        assert list(target.iterdir()) == []  # not one image went through their folder
        assert f"refusing scratch folder {root}" in d.log.read_text()
        assert (d.state / "scratch").stat().st_mode & 0o777 == 0o700
    finally:
        d.stop()
        for p in (root, theirs):
            if p.is_symlink():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)


def test_boot_restore_while_the_bucket_is_down_waits_for_it_and_marks_nothing_bad(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    boot_id = workdir / "boot_id"
    boot_id.write_text("boot-1\n")
    d = Daemon(workdir, s3_config(moto, bucket))
    d.env = {"CHECKPOINTER_BOOT_ID_FILE": str(boot_id), **S3_ENV}
    port = free_port()
    try:
        d.start()
        d.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        for _ in range(3):
            http_get(port)
        newest = d.checkpoint("web")
        deadline = time.monotonic() + 60
        while not any(newest in k for k in moto.keys(bucket, "ckpt/manifests/")):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # The host reboots: the tree, tmpfs and the local cache are gone; the network is not
        # up yet when the daemon starts.
        d.proc.kill() if d.proc else None
        d.proc = None
        d.kill_workloads()
        d.drop_kept_images()
        shutil.rmtree(d.state / "cache", ignore_errors=True)
        boot_id.write_text("boot-2\n")
        moto.pause()
        try:
            d.proc = subprocess.Popen(
                [sys.executable, "-m", "checkpointer.cli", "daemon", "--config", str(d.config)],
                stdout=open(d.log, "ab"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                env={**os.environ, **d.env},
                start_new_session=True,
            )
            deadline = time.monotonic() + 60
            while "trying again later" not in d.log.read_text():
                assert time.monotonic() < deadline, d.log.read_text()[-3000:]
                time.sleep(0.5)
        finally:
            moto.resume()
        st = d.wait_for("web", lambda s: s["state"] == "running", timeout=90)
        assert st["bad_checkpoints"] == []
        assert st["restores"][-1]["checkpoint"] == newest and st["restores"][-1]["result"] == "ok"
        assert any(r["result"] == "retry" for r in st["restores"])
        assert http_get(port) == "4"  # the newest checkpoint's count + 1: no state lost
    finally:
        d.stop()


def test_the_first_failed_restore_of_a_workload_fires_its_alert(workdir: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus package is missing: `make test` installs it")
    rules = workdir / "alerts.yaml"
    rules.write_text(re.sub(r"for: \S+", "for: 1s", ALERTS.read_text()))
    d = Daemon(workdir)
    with daemon_and_prometheus(d, rules) as prom:
        port = free_port()
        d.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        http_get(port)
        d.checkpoint("web")
        query = 'checkpointer_restores_total{workload="web",reason="manual",result="failure"}'
        scraped = f"count_over_time({query}[1m]) >= 3"  # a few scrapes of the 0: increase()
        deadline = time.monotonic() + 30
        while not prom.api("query", query=scraped)["data"]["result"]:
            assert time.monotonic() < deadline, "the failure series should exist at 0"
            time.sleep(0.5)
        # the restore panels' histogram exists too, at 0, before any restore
        count = prom.api(
            "query", query='checkpointer_restore_duration_seconds_count{workload="web"}'
        )
        assert [r["value"][1] for r in count["data"]["result"]] == ["0"], count
        kill_tree(d.pid("web"))
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        try:
            r = d.cli("restore", "web", check=False)
            assert r.returncode == 1 and "error:" in r.stderr
        finally:
            squatter.close()
        deadline = time.monotonic() + 40
        while True:
            firing = {
                (a["labels"]["alertname"], a["labels"].get("workload"))
                for a in prom.api("alerts")["data"]["alerts"]
                if a["state"] == "firing"
            }
            if ("CheckpointerRestoreFailed", "web") in firing:
                break
            assert time.monotonic() < deadline, firing
            time.sleep(1)


def test_a_metrics_port_in_use_stops_the_start_with_one_line_before_anything_runs(
    tmp_path: Path,
) -> None:
    """Was "internal error (OSError: [Errno 98] Address already in use) ... report it", after
    the daemon had adopted and restored its workloads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = tmp_path / "config.yaml"
        conf.write_text(
            f"state_dir: {tmp_path / 'state'}\nmetrics:\n  address: 127.0.0.1\n  port: {port}\n"
        )
        err = refused_start(conf)
    assert f"cannot listen on 127.0.0.1:{port}" in err and "metrics.port" in err, err
    assert not (tmp_path / "state" / "checkpointer.sock").exists()
