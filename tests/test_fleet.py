"""A fleet of hosts on one bucket: one owner per workload, migration, failover, fencing.

Each host is a daemon in network, mount and UTS namespaces of its own (tests/support/hosts.py):
its own state folder (invisible to the others, at another path), its own /dev/shm, its own
loopback (so a restored server takes the same port), all reaching one moto_server through a
bridge the test creates. Leases are short here (TTL 6 s, renewed every second)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.support import COUNTER, Host, Network, s3_config

FLEET = (
    "host:\n  id: {name}\n"
    "fleet:\n  enabled: true\n  failover: {failover}\n"
    "  lease_ttl: 6s\n  renew_every: 1s\n  clock_skew: 1s\n"
)


def fleet(net: Network, bucket: str, name: str, failover: bool, key: Path | None) -> Host:
    extra = s3_config(net.moto, bucket) + FLEET.format(name=name, failover=str(failover).lower())
    return net.add_host(name, extra, key_file=key)


def until(what: str, pred: object, timeout: float, log: Host | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, what + (
            "\n--- log ---\n" + log.log.read_text()[-4000:] if log else ""
        )
        time.sleep(0.2)


def committed_on(host: Host, name: str, checkpoint_id: str, timeout: float = 60) -> None:
    """Until `host` lists the checkpoint: the head names it, so it is committed for every
    host. Its manifest in the bucket is not enough: A's spool uploads the manifest, then
    writes the head (the commit point, docs/fleet.md R4); an owner stopped between the two
    has committed nothing, and the host that takes over rightly finds no checkpoint."""

    def listed() -> bool:
        r = host.cli("list", name, "--json", check=False)
        return r.returncode == 0 and checkpoint_id in {c["id"] for c in json.loads(r.stdout)}

    until(f"{host.name} lists {checkpoint_id} of {name}", listed, timeout, host)


def test_migrate_moves_the_counter_to_another_host_with_its_count(workdir: Path) -> None:
    port = 18080
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-m-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        a.start()
        b = fleet(net, bucket, "b", False, a.key_file)
        b.start()
        a.cli("run", "web", "--every", "1h", "--", sys.executable, str(COUNTER), str(port))
        assert a.serve(port, 14) == "14"
        a.checkpoint("web")  # what B fetches ahead; the migration then moves only the rest
        assert a.serve(port, 1) == "15"
        hosts = {h["host"]: h["workloads"] for h in a.json("hosts")}
        assert hosts == {"a": ["web"], "b": []}
        r = a.json("migrate", "web", "--to", "b")
        assert r["to"] == "b"
        assert not a.connects(port)  # stopped on A once handed over
        # Its final checkpoint was not copied into a disk slot while the tree stood stopped:
        # A drops its slots once it hands over (was: the copy lengthened the migration's stop)
        copied = [x for x in a.log.read_text().splitlines() if "disk image of web" in x]
        assert copied and not [x for x in copied if r["checkpoint"] in x], copied  # the one before
        st = b.wait_for("web", lambda s: s["state"] == "running", timeout=30)
        assert st["restores"][-1]["reason"] == "migration"
        assert b.http_get(port) == "16"  # its count + 1: nothing lost, on B
        log = b.log.read_text()  # B fetched the image ahead, then only what changed
        assert "ahead of its hand-over" in log and "are copied from it" in log, log[-3000:]
        assert str(a.state) != str(b.state) and not b.view(a.folder).exists()
        assert a.status("web")["state"] == "elsewhere" and a.status("web")["owner"] == "b"
        assert b.status("web")["owner"] == "b"
        until("hosts shows web on b", lambda: {h["host"]: h["workloads"] for h in a.json("hosts")}
              == {"a": [], "b": ["web"]}, 10)  # fmt: skip
        b.checkpoint("web")  # B checkpoints it now; A may not
        r2 = a.cli("checkpoint", "web", check=False)
        assert r2.returncode == 1 and "lease" in r2.stderr, r2.stderr


def test_failover_takes_over_a_dead_hosts_workload_and_the_host_does_not_restore_it_on_return(
    workdir: Path,
) -> None:
    port = 18081
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-f-{os.getpid()}")
        a = fleet(net, bucket, "a", True, None)
        a.start()
        b = fleet(net, bucket, "b", True, a.key_file)
        b.start()
        a.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        a.serve(port, 7)
        committed_on(b, "web", a.checkpoint("web"))  # the head names it: B could restore it
        a.serve(port, 3)  # served after the last checkpoint: lost with the host
        t0 = time.monotonic()
        a.kill9()  # host A dies, daemon and workloads
        first = b.http_get(port, timeout=40)  # answers once B took it over
        took = time.monotonic() - t0
        assert first == "8", b.log.read_text()[-3000:]  # the last checkpoint's count + 1
        assert b.status("web")["restores"][-1]["reason"] == "failover"
        assert took < 6 + 1 + 15, took
        a.start()  # A comes back on its own disk: it finds web owned by B
        st = a.wait_for("web", lambda s: s["state"] == "elsewhere", timeout=30)
        assert st["owner"] == "b" and not a.connects(port)
        assert b.http_get(port) == "9"  # still B's, undisturbed
        print(f"\nfailover: kill -9 of host A to B serving: {took:.1f}s")


def test_a_frozen_owner_loses_its_lease_stops_its_copy_and_checkpoints_nothing_restorable(
    workdir: Path,
) -> None:
    port = 18082
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-s-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        a.start()
        b = fleet(net, bucket, "b", True, a.key_file)
        b.start()
        a.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        a.serve(port, 4)
        before = a.checkpoint("web")
        committed_on(b, "web", before)
        a.freeze()  # partitioned or paused: A's daemon and its workload stop
        assert b.http_get(port, timeout=40) == "5", b.log.read_text()[-3000:]
        a.thaw()
        # A wakes up: its lease is gone, it stops its own copy by itself and commits nothing.
        until("A stopped its copy", lambda: a.status("web")["state"] == "elsewhere", 20, a)
        assert not a.connects(port)
        r = a.cli("checkpoint", "web", check=False)
        assert r.returncode == 1, r.stdout
        ids = [c["id"] for c in b.json("list", "web")]
        assert before in ids
        # B's own restores never pick a checkpoint A took under its old lease after losing it
        b.cli("rollback", "web", "--back", "0")
        assert b.http_get(port) == "5"  # B's newest restorable checkpoint is the one before


def test_three_hosts_one_dies_exactly_one_of_the_other_two_takes_over(workdir: Path) -> None:
    port = 18083
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-3-{os.getpid()}")
        a = fleet(net, bucket, "a", True, None)
        a.start()
        b = fleet(net, bucket, "b", True, a.key_file)
        c = fleet(net, bucket, "c", True, a.key_file)
        b.start()
        c.start()
        a.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        a.serve(port, 2)
        committed_on(b, "web", a.checkpoint("web"))
        a.kill9()

        def taken() -> list[Host]:
            return [h for h in (b, c) if "web" in {w["name"] for w in h.json("status")}
                    and h.status("web")["state"] == "running"]  # fmt: skip

        until("one of B and C took web over", lambda: taken(), 40, b)
        time.sleep(4)  # time for a second, wrong, take-over to show
        winners = taken()
        assert len(winners) == 1, [h.name for h in winners]
        loser = c if winners[0] is b else b
        assert not loser.connects(port)
        assert winners[0].http_get(port) == "3"
        owners = {h["host"]: h["workloads"] for h in loser.json("hosts")}
        assert owners[winners[0].name] == ["web"]


def test_a_daemon_back_after_its_lease_expired_still_restores_the_older_checkpoints(
    workdir: Path,
) -> None:
    """Nobody took the workload while its daemon was down past the TTL: the daemon keeps its
    lease (renewed in place, the same generation) and its checkpoints stay restorable."""
    port = 18084
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-r-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        a.start()
        a.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        a.serve(port, 6)
        net.moto.wait_for_checkpoint(bucket, a.checkpoint("web"))
        a.terminate()  # the daemon stops; its workload runs on
        time.sleep(9)  # past the lease's TTL + skew
        a.start()  # re-adopts web and renews its expired lease: nobody else took it
        assert a.http_get(port) == "7"
        os.kill(a.pid("web"), 9)
        assert a.http_get(port, timeout=30) == "7", a.log.read_text()[-3000:]  # 6 + 1
        assert a.status("web")["restores"][-1]["result"] == "ok"
