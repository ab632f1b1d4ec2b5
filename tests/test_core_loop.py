"""The core loop with real CRIU: checkpoint, kill -9, restore, roll back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import (
    CLI,
    COUNTER,
    PROGRAMS,
    ROOT,
    Daemon,
    counter_started_elsewhere,
    free_port,
    http_get,
    kill_tree,
    redis_client,
    redis_command,
    serve,
    tree_pids,
)
from tests.support.processes import working_in


def test_seed_scenario_restore_continues_from_checkpoint(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    assert serve(port, 14) == "15"
    d.checkpoint("web")
    assert serve(port, 5) == "20"
    kill_tree(d.pid("web"))
    r = d.cli("restore", "web", check=False)
    assert r.returncode == 0, r.stderr
    assert http_get(port) == "16"


def test_rollback_to_id_and_back_n(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    assert serve(port, 4) == "5"
    first = d.checkpoint("web")
    assert serve(port, 5) == "10"
    d.checkpoint("web")
    assert serve(port, 4) == "14"
    assert d.json("rollback", "web", "--to", first)["source"] == "disk image"
    assert http_get(port) == "6"
    serve(port, 3)  # 9
    # Without disk images: rebuilt partly from the kept image of the newest, and still exact.
    shutil.rmtree(d.state / "images")
    d.cli("rollback", "web", "--back", "1")  # newest is the one at 10; one back: the one at 5
    assert http_get(port) == "6"
    assert "are copied from it" in d.log.read_text()
    d.cli("rollback", "web", "--back", "0")
    assert http_get(port) == "11"
    listed = d.json("list", "web")
    assert [c["id"] for c in listed][-1] == first and len(listed) == 2


def test_log_has_output_from_before_and_after_restore(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    serve(port, 2)  # 3
    d.checkpoint("web")
    serve(port, 2)  # 5
    kill_tree(d.pid("web"))
    d.cli("restore", "web")
    assert http_get(port) == "4"
    deadline = time.monotonic() + 5
    while "served request 4\n" not in d.workload_log("web").split("served request 5\n", 1)[-1]:
        assert time.monotonic() < deadline, d.workload_log("web")
        time.sleep(0.1)
    log = d.workload_log("web")
    assert "served request 3" in log and "served request 5" in log  # before the restore
    assert log.index("served request 5") < log.rindex("served request 4")  # after it


def test_repeated_cycles(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    expected = 1
    for _cycle in range(5):
        expected = int(serve(port, 3))
        d.checkpoint("web")
        serve(port, 2)
        kill_tree(d.pid("web"))
        d.cli("restore", "web")
        assert http_get(port) == str(expected + 1)
    assert d.status("web")["state"] == "running"


def test_tree_with_child_process_and_threads_restored_whole(daemon: Daemon) -> None:
    port = free_port()
    daemon.cli(
        "run",
        "tree",
        "--no-auto-restore",
        "--",
        sys.executable,
        str(PROGRAMS / "tree_server.py"),
        str(port),
    )
    for _ in range(6):
        last = http_get(port)
    assert last == "6 6 6"
    root = daemon.pid("tree")
    procs_before = len(tree_pids(root))
    threads_before = threads_of(root)
    assert procs_before == 2 and threads_before >= 3
    daemon.checkpoint("tree")
    http_get(port)
    kill_tree(root)
    daemon.cli("restore", "tree")
    assert http_get(port) == "7 7 7"
    new_root = daemon.pid("tree")
    assert new_root != root
    assert len(tree_pids(new_root)) == procs_before
    threads = threads_of(new_root)
    assert threads == threads_before


@pytest.fixture
def redis_port(daemon: Daemon) -> int:
    port = free_port()
    daemon.cli("run", "cache", "--no-auto-restore", "--", *redis_command(port))
    return port


def test_redis_keys_before_checkpoint_survive_and_later_ones_do_not(
    daemon: Daemon, redis_port: int
) -> None:
    client = redis_client(redis_port)
    pipe = client.pipeline()
    for i in range(20000):
        pipe.set(f"before:{i}", f"value-{i}" * 8)
    pipe.execute()
    client.close()  # an open client connection is an established TCP socket: CRIU refuses it
    daemon.checkpoint("cache")
    client = redis_client(redis_port)
    pipe = client.pipeline()
    for i in range(5000):
        pipe.set(f"after:{i}", "x")
    pipe.execute()
    assert client.dbsize() == 25000
    client.close()
    kill_tree(daemon.pid("cache"))
    daemon.cli("restore", "cache")
    client = redis_client(redis_port)
    assert client.dbsize() == 20000
    assert client.get("before:19999") == ("value-19999" * 8).encode()
    assert client.get("after:0") is None
    client.close()


def test_checkpoint_with_open_tcp_connection_fails_clearly(daemon: Daemon, redis_port: int) -> None:
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", redis_port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    try:
        conn.sendall(b"PING\r\n")
        assert conn.recv(100) == b"+PONG\r\n"
        r = daemon.cli("checkpoint", "cache", check=False)
    finally:
        conn.close()
    assert r.returncode == 1
    assert "tcp_established" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "CRIU log:" in r.stderr
    log_path = r.stderr.split("CRIU log: ")[1].rstrip(")\n")
    assert Path(log_path).read_text()  # the log of the failed attempt is kept
    assert daemon.status("cache")["state"] == "running"  # the workload kept running


def test_restored_process_is_in_its_own_pid_namespace(counter: tuple[Daemon, int]) -> None:
    d, _port = counter
    d.checkpoint("web")
    kill_tree(d.pid("web"))
    d.cli("restore", "web")
    status = Path(f"/proc/{d.pid('web')}/status").read_text().splitlines()
    nspid = next(ln for ln in status if ln.startswith("NSpid:")).split()
    assert nspid[-1] == "1" and len(nspid) == 3


def test_unregister_stops_the_whole_tree(daemon: Daemon) -> None:
    port = free_port()
    daemon.cli(
        "run",
        "tree",
        "--no-auto-restore",
        "--",
        sys.executable,
        str(PROGRAMS / "tree_server.py"),
        str(port),
    )
    http_get(port)
    pids = tree_pids(daemon.pid("tree"))
    assert len(pids) == 2
    daemon.cli("unregister", "tree")
    for pid in pids:
        assert not _exists(pid)


def _exists(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


def threads_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("Threads:")[1].split()[0])


def test_no_workload_left_running_check(worker_folders: list[Path]) -> None:
    """Guard for the fixtures: nothing the previous tests of this worker started is still
    running (their workloads and daemons run in their folders; parallel workers' do not)."""
    assert working_in(worker_folders) == {}


def test_adopted_workload_checkpoint_and_restore(daemon: Daemon) -> None:
    port = free_port()
    with counter_started_elsewhere(port) as proc:
        daemon.cli("register", "adopted", "--no-auto-restore", "--pid", str(proc.pid))
        assert daemon.status("adopted")["kind"] == "adopted"
        assert serve(port, 6) == "7"
        daemon.checkpoint("adopted")
        serve(port, 3)
        proc.kill()
        proc.wait()  # we are its parent: reap it so its PID is free for the restore
        daemon.cli("restore", "adopted")
        assert http_get(port) == "8"


def test_scheduled_checkpoints_and_keep_last(daemon: Daemon) -> None:
    port = free_port()
    daemon.cli(
        "run",
        "sched",
        "--every",
        "1s",
        "--keep-last",
        "3",
        "--",
        sys.executable,
        str(COUNTER),
        str(port),
    )
    http_get(port)
    deadline = time.monotonic() + 30
    while len(daemon.json("list", "sched")) < 3:
        assert time.monotonic() < deadline, daemon.log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(2.5)
    st = daemon.status("sched")
    assert st["schedule"] == "every 1.0s" and st["next_checkpoint"]
    assert st["last_checkpoint_age_seconds"] < 5
    # A listing taken between a commit and its retention pass may show a fourth: stop the
    # schedule (unregister waits for the checkpoint in flight, retention included) and look.
    daemon.cli("unregister", "sched")
    listed = [c["id"] for c in daemon.json("list", "sched")]
    assert len(listed) == 3  # retention keeps the newest three
    assert len(set(listed)) == 3 and listed == sorted(listed, reverse=True)


def test_restore_uses_the_kept_image_only_if_it_matches(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    serve(port, 4)  # 5
    d.checkpoint("web")
    serve(port, 2)
    kill_tree(d.pid("web"))
    r = d.json("restore", "web")
    assert r["source"] == "kept image" and http_get(port) == "6"
    # Damage the kept image: the restore must notice and fetch from the repository instead.
    from checkpointer.engine import tmpfs_scratch_root

    pages = sorted((tmpfs_scratch_root(d.state) / "hot" / "web").glob("pages-*.img"))
    assert pages, "no kept image"
    data = bytearray(pages[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages[0].write_bytes(bytes(data))
    kill_tree(d.pid("web"))
    r = d.json("restore", "web")
    assert r["source"] == "disk image" and http_get(port) == "6"
    # And with the disk image damaged too (same boot: its stamps tell), the repository.
    for p in (d.state / "images" / "web").glob("*/pages-*.img"):
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    kill_tree(d.pid("web"))
    r = d.json("restore", "web")
    assert r["source"] == "repository" and http_get(port) == "6"


def test_workloads_started_in_one_folder_checkpoint_at_the_same_time(
    daemon: Daemon, workdir: Path
) -> None:
    """CRIU's parasite mounts a private /proc on "proc.crtools" in the working directory of a
    process whose /proc is not its namespace's (every managed workload): concurrent dumps of
    workloads started in one folder collide there unless the daemon runs them one at a time."""
    shared = workdir / "shared"
    shared.mkdir()
    names = [f"s{i}" for i in range(6)]
    for n in names:
        daemon.cli("run", n, "--no-auto-restore", "--cwd", str(shared), "--", "sleep", "100000")
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [*CLI, "checkpoint", "--config", str(daemon.config), n],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for n in names
        ]
        errors = [(n, p.communicate(timeout=120)[1]) for n, p in zip(names, procs, strict=True)]
        assert [(n, err) for (n, err), p in zip(errors, procs, strict=True) if p.returncode] == []
    assert all(len(daemon.json("list", n)) == 3 for n in names)
    assert not (shared / "proc.crtools").exists()


def test_leftover_proc_crtools_directory_fails_clearly(daemon: Daemon, workdir: Path) -> None:
    folder = workdir / "w"
    folder.mkdir()
    daemon.cli("run", "x", "--no-auto-restore", "--cwd", str(folder), "--", "sleep", "100000")
    (folder / "proc.crtools").mkdir()  # as an interrupted CRIU run leaves it
    r = daemon.cli("checkpoint", "x", check=False)
    assert r.returncode == 1
    assert "proc.crtools" in r.stderr and "remove it" in r.stderr and "Traceback" not in r.stderr
    assert daemon.json("list", "x") == []  # nothing half-stored
    # Left for more than a minute, unmounted and empty: stale, removed, the dump goes through.
    old = time.time() - 120
    os.utime(folder / "proc.crtools", (old, old))
    daemon.cli("checkpoint", "x")
    assert len(daemon.json("list", "x")) == 1
    assert not (folder / "proc.crtools").exists()
