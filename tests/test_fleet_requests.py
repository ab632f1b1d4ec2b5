"""Issue 27 for real: a host's storage requests per tick do not grow with another host's
workloads, and failover still works.

Two daemons in namespaces of their own (tests/support/hosts.py) on one moto bucket, leases as
in tests/test_fleet.py (TTL 6 s, a tick every second). Host A's requests are counted by its
own daemon (`checkpointer_storage_operations_total{op}`, read from its metrics endpoint:
every request to the bucket, retries included), over a window while host B holds no workload,
then again while B holds 502: 500 `sleep`s started in B's namespaces and declared in its
config (adopted by PID, each claimed through the daemon's own lease and heartbeat code at its
start) and two counters with checkpoints. Then B dies (kill -9 of everything in it) and A
takes the two counters over (bench.fleet_scale measures the same at 100 hosts)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.support import COUNTER, Host, Network
from tests.test_fleet import fleet, until

WINDOW = 15.0  # seconds of A's requests counted, each time
MANY = 500
_OPS = re.compile(r'^checkpointer_storage_operations_total\{op="(\w+)"\} (\S+)$', re.M)


def requests(host: Host) -> dict[str, float]:
    """The host's storage requests so far, by kind, from its own metrics."""
    page = host.serve(host.metrics_port, 1, path="/metrics")
    return {op: float(n) for op, n in _OPS.findall(page)}


def per_tick(host: Host) -> dict[str, float]:
    """The host's requests per second (one tick: renew_every 1 s) over WINDOW seconds."""
    before = requests(host)
    time.sleep(WINDOW)
    after = requests(host)
    return {op: round((after[op] - before.get(op, 0.0)) / WINDOW, 2) for op in after}


def adopted(host: Host, n: int) -> str:
    """n `sleep`s started in the host's namespaces (they die with it), declared in its config
    to be adopted by PID at the daemon's start."""
    script = f"for i in $(seq {n}); do sleep infinity </dev/null >/dev/null 2>&1 & echo $!; done"
    pids = host.run("sh", "-c", script).stdout.split()
    assert len(pids) == n, pids
    return "workloads:\n" + "".join(
        f"  - name: idle{i}\n    pid: {p}\n" for i, p in enumerate(pids)
    )


# B's start adopts 500 workloads: ~3 min on a loaded 2-core machine, most of it the engine
# saving its registry (every workload, fsynced) once per registration.
@pytest.mark.timeout(900)
def test_a_hosts_requests_per_tick_do_not_grow_with_another_hosts_500_workloads(
    workdir: Path,
) -> None:
    ports = (18091, 18092)
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-n-{os.getpid()}")
        a = fleet(net, bucket, "a", True, None)
        a.start()
        b = fleet(net, bucket, "b", False, a.key_file)
        b.start()
        time.sleep(3)  # both running their ticks
        idle = per_tick(a)

        b.terminate()  # B comes back with 500 workloads declared, claimed at its start
        b.config.write_text(b.config.read_text() + adopted(b, MANY))
        t0 = time.monotonic()
        b.start()
        started = time.monotonic() - t0
        for i, port in enumerate(ports):
            b.cli("run", f"web{i}", "--", sys.executable, str(COUNTER), str(port))
            assert b.serve(port, 3 + i) == str(3 + i)
            net.moto.wait_for_checkpoint(bucket, b.checkpoint(f"web{i}"))  # the spool uploads it
        hosts = {h["host"]: len(h["workloads"]) for h in a.json("hosts")}
        assert hosts == {"a": 0, "b": MANY + 2}, hosts
        busy = per_tick(a)
        print(f"\nB started with {MANY} workloads in {started:.1f}s")
        print(f"A's requests per tick, B holding 0: {idle}")
        print(f"A's requests per tick, B holding {MANY + 2}: {busy}")
        for op in ("get", "put", "list"):
            # The same within what a window's edges and the once-a-minute clock check move.
            assert abs(busy[op] - idle[op]) <= 3 / WINDOW + 0.01, (op, idle, busy)
        assert busy["get"] < 5 and busy["put"] < 2 and busy["list"] < 2, busy

        t0 = time.monotonic()
        b.kill9()  # B dies, daemon and workloads
        for i, port in enumerate(ports):  # A takes the counters over: count + 1
            assert a.http_get(port, timeout=60) == str(4 + i), a.log.read_text()[-3000:]
            assert a.status(f"web{i}")["restores"][-1]["reason"] == "failover"
        took = time.monotonic() - t0
        print(f"failover of B's 2 counters (and {MANY} leases to look at): {took:.1f}s")
        assert took < 6 + 1 + 30, took
        until("A's hosts shows B gone", lambda: [h["host"] for h in a.json("hosts")] == ["a"], 20)
