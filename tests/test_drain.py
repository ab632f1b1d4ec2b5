"""`checkpointer drain` (checkpointer/engine/drain.py): every workload of a host migrated to
the fleet's other hosts, least-loaded first; one that cannot move runs on here, listed."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from checkpointer.engine.drain import pick_targets
from storage.leases import Lease, LeaseState
from tests.support import COUNTER, Network
from tests.test_fleet import fleet, until

# An established TCP connection: CRIU refuses to dump it without --tcp-established, so its
# final checkpoint fails and migrate leaves it running here (no test hook in the daemon).
CONNECTED = (
    "import socket, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "c = socket.create_connection(s.getsockname()); a, _ = s.accept()\n"
    "time.sleep(86400)\n"
)


def lease(name: str, holder: str) -> Lease:
    return Lease(workload=name, holder=holder, state=LeaseState.HELD, generation=1)


def test_targets_are_least_loaded_first_and_never_a_draining_host() -> None:
    leases = [lease("x", "b"), lease("y", "b"), lease("z", "d")]
    live = ["a", "b", "c", "d"]
    got = pick_targets(["w1", "w2", "w3"], "a", live, leases, draining={"c"}, to=None)
    assert got == {"w1": "d", "w2": "b", "w3": "d"}  # c drains: never picked; d had 1, b 2
    assert pick_targets(["w1"], "a", ["a"], [], set(), None) == {"w1": None}
    assert pick_targets(["w1", "w2"], "a", live, leases, set(), "b") == {"w1": "b", "w2": "b"}


def test_drain_moves_every_workload_with_its_state_and_lists_the_one_that_cannot_move(
    workdir: Path,
) -> None:
    ports = [18090, 18091, 18092]
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-drain-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        a.start()
        b = fleet(net, bucket, "b", False, a.key_file)
        b.start()
        for i, port in enumerate(ports):
            a.cli("run", f"web{i}", "--every", "1h", "--", sys.executable, str(COUNTER), str(port))
            assert a.serve(port, 3 + i) == str(3 + i)
        a.cli("run", "pinned", "--every", "1h", "--", sys.executable, "-c", CONNECTED)
        pinned_pid = a.pid("pinned")
        seen_draining = threading.Event()

        def watch() -> None:  # B's `hosts` sees A draining while it drains
            while not seen_draining.is_set() and not done.is_set():
                if any(h["host"] == "a" and h.get("draining") for h in b.json("hosts")):
                    seen_draining.set()

        done = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            r = a.cli("drain", "--json", check=False)
        finally:
            done.set()
            watcher.join()
        assert r.returncode == 1, r.stderr  # not fully drained: said by the exit status

        report = {o["workload"]: o for o in json.loads(r.stdout)["workloads"]}
        assert {n: o["result"] for n, o in report.items()} == {
            "web0": "moved",
            "web1": "moved",
            "web2": "moved",
            "pinned": "stayed",
        }, report
        assert "TCP" in report["pinned"]["why"] or "tcp" in report["pinned"]["why"], report
        print(f"\ndrain: {json.loads(r.stdout)['duration_seconds']:.1f}s for 3 moved, 1 stayed")
        for i, port in enumerate(ports):
            b.wait_for(f"web{i}", lambda s: s["state"] == "running", timeout=30)
            assert b.http_get(port) == str(4 + i)  # its count + 1: state moved with it
            assert a.status(f"web{i}")["state"] == "elsewhere"
        st = a.status("pinned")
        assert st["state"] == "running" and st["pid"] == pinned_pid, st  # runs on, thawed
        assert seen_draining.is_set()
        until("A no longer draining", lambda: not any(
            h.get("draining") for h in b.json("hosts")), 10)  # fmt: skip
        table = a.cli("hosts").stdout
        assert "draining" not in table
