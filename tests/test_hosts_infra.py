"""The fleet tests' hosts (tests/support/hosts.py) do what they claim: each daemon runs in a
network and a mount namespace of its own, all reach one moto_server through a bridge, and a
workload checkpointed on host A restores on host B from the bucket alone. Everything is gone
at the end, also after a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import COUNTER, Host, Network, free_port, s3_config


def listens_here(port: int) -> bool:
    """Whether anything answers on 127.0.0.1:PORT in the test's own (root) namespace."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def namespaces(hosts: list[Host]) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for st in (os.stat(h.netns_file) for h in hosts)}


def in_namespaces(ns: set[tuple[int, int]]) -> list[int]:
    """The processes (not zombies) in any of these network namespaces."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in ns:
            out.append(int(entry))
    return out


def assert_torn_down(
    net: Network, hosts: list[Host], pids: list[int], ns: set[tuple[int, int]]
) -> None:
    assert net.leftovers() == []
    assert in_namespaces(ns) == []
    assert all(h.anchor is None for h in hosts)
    assert not any(
        h.netns in subprocess.check_output(["ip", "netns", "list"], text=True) for h in hosts
    )
    links = subprocess.check_output(["ip", "-o", "link"], text=True)
    assert net.bridge not in links
    assert not any(h.veth in links for h in hosts)
    assert [p for p in pids if not dead(p)] == []


def dead(pid: int) -> bool:
    """Gone, or a zombie that only PID 1 has yet to reap (the daemon was a subreaper)."""
    try:
        return state(pid) == "Z"
    except FileNotFoundError:
        return True


def test_a_workload_checkpointed_on_host_a_restores_on_host_b(workdir: Path) -> None:
    t0 = time.monotonic()
    port = free_port()
    seen: list[int] = []
    with Network(workdir) as net:
        assert net.moto.url.startswith(f"http://{net.gateway}:")
        bucket = net.moto.create_bucket(f"ckpt-hosts-{os.getpid()}")
        a = net.add_host("a", s3_config(net.moto, bucket))
        b = net.add_host("b", s3_config(net.moto, bucket))
        ns = namespaces([a, b])
        seen += [h.anchor.pid for h in (a, b) if h.anchor]
        assert [h.run("hostname").stdout.strip() for h in (a, b)] == ["a", "b"]
        a.start()
        a.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        assert a.serve(port, 5) == "5"
        seen += [a.proc.pid if a.proc else 0, a.pid("web")]
        # A's 127.0.0.1:PORT is A's alone: neither B nor the root namespace has it.
        assert not b.connects(port)
        assert not listens_here(port)
        cid = a.checkpoint("web")
        net.moto.wait_for_checkpoint(bucket, cid)
        a_log = a.log
        a.stop()
        assert a.processes() == []

        shutil.copy(a.key_file, b.key_file)  # the repository's key, copied to host B
        b.start()
        assert "web" not in names(b)  # B's registry does not know it: only the bucket does
        assert not b.connects(port)  # before the restore, nothing listens on B
        b.cli("restore", "web")  # known to B from the bucket only
        assert b.http_get(port) == "6"
        seen += [b.proc.pid if b.proc else 0, b.pid("web")]
        deadline = time.monotonic() + 10
        while "served request 6" not in b.workload_log("web"):
            assert time.monotonic() < deadline, b.workload_log("web") or b.log.read_text()[-3000:]
            time.sleep(0.1)
        assert not a.connects(port)  # the workload is on B now, not back on A

        # Private folders: A's state folder does not exist in B's mount namespace (nor in the
        # test's), B's is another path; each host has its own /dev/shm.
        assert str(a.state) != str(b.state)
        assert a.view(a.state / "workloads.json").exists()
        assert not b.view(a.folder).exists()
        assert not a.view(b.folder).exists()
        assert not a.state.exists() and not b.state.exists()
        assert b.run("test", "-e", str(a.folder)).returncode == 1
        assert b.run("test", "-d", str(b.state)).returncode == 0
        shm = [h.run("findmnt", "-n", "-o", "SOURCE", "/dev/shm").stdout.split() for h in (a, b)]
        assert shm[0][-1] == "ckshm-a" and shm[1][-1] == "ckshm-b"
        print(f"\nA to B through the bucket: {time.monotonic() - t0:.1f}s")
    assert a_log.exists() and "daemon" in a_log.read_text().lower()  # read after teardown
    assert not listens_here(port)
    assert_torn_down(net, [a, b], seen, ns)


def test_freeze_thaw_kill9_and_teardown_after_a_failure(workdir: Path) -> None:
    port = free_port()
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed here"), Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-freeze-{os.getpid()}")
        a = net.add_host("a", s3_config(net.moto, bucket))
        ns = namespaces([a])
        a.start()
        a.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        assert a.http_get(port) == "1"
        daemon, web = a.proc.pid if a.proc else 0, a.pid("web")
        seen += [daemon, web]
        a.freeze()
        deadline = time.monotonic() + 10  # each stops when it next runs
        while not all(state(p) == "T" for p in (daemon, web)):
            assert time.monotonic() < deadline, [state(p) for p in (daemon, web)]
            time.sleep(0.01)
        assert not a.connects(port)  # stopped: the kernel accepts, nobody answers
        a.thaw()
        assert a.http_get(port) == "3"  # the frozen attempt was request 2
        a.kill9()  # the host dies
        assert dead(web) and dead(daemon)
        assert a.processes() == []
        assert a.view(a.state / "workloads.json").exists()  # its disk stays
        a.start()  # the daemon comes back on the same disk and knows the workload
        assert names(a) == ["web"]
        seen.append(a.proc.pid if a.proc else 0)
        raise RuntimeError("the test failed here")
    assert_torn_down(net, [a], seen, ns)


def names(host: Host) -> list[str]:
    return [str(w["name"]) for w in host.json("status")]


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_the_routed_fallback_reaches_moto_and_runs_a_daemon(workdir: Path) -> None:
    """The set-up used where the kernel has no bridges: one routed veth pair per host."""
    with Network(workdir, routed=True) as net:
        assert net.mode == "routed"
        bucket = net.moto.create_bucket(f"ckpt-routed-{os.getpid()}")
        a = net.add_host("a", s3_config(net.moto, bucket))
        b = net.add_host("b", s3_config(net.moto, bucket))
        ns = namespaces([a, b])
        assert "moto" in b.http_get(net.moto.port, address=net.gateway, path="/moto-api/")
        a.start()
        assert names(a) == []
    assert_torn_down(net, [a, b], [], ns)
