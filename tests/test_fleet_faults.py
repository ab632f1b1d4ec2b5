"""A fleet under faults of its own hosts: at no instant do two copies of a workload answer.

Each test pauses or cuts off the owner A while B waits with failover on, and a poller asks
both hosts' copy of the counter (127.0.0.1:PORT inside each host) every 50 ms from a thread
that entered the host's network namespace, so that the poller itself is never paused or cut
off with the host. Every answer is an interval [request sent, answer read] on the test's
monotonic clock (the hosts share this kernel's clock); A's and B's intervals must never
overlap, and A's copy must stop answering no later than its lease's local deadline: the last
renewal A can have sent (before the fault) + TTL - skew."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from checkpointer.workloads import process
from tests.support import COUNTER, Host, Moto, Network, free_port, http_get
from tests.test_fleet import committed_on, fleet, until
from tests.test_fleet_errors import fleet_host

CLONE_NEWNET = 0x40000000
TTL, SKEW = 6.0, 1.0  # tests/test_fleet.py's FLEET


class Poller:
    """Asks 127.0.0.1:PORT inside one host every 50 ms; keeps (sent, answered) of each
    answer. Each request may take 0.3 s: longer is no answer (a stopped copy never answers,
    and one that answers late would be seen as late)."""

    def __init__(self, host: Host, port: int) -> None:
        self.host, self.port = host, port
        self.answers: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._entered = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"poll-{host.name}", daemon=True)
        self._thread.start()
        assert self._entered.wait(10), self.error

    def _run(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.host.netns_file, os.O_RDONLY)
            try:  # this thread alone enters the host's network namespace
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e
            return
        self._entered.set()
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=0.3)
                try:
                    conn.request("GET", "/")
                    body = conn.getresponse().read()
                finally:
                    conn.close()
                if body.strip().isdigit():
                    self.answers.append((sent, time.monotonic()))
            except OSError:
                pass
            self._stop.wait(0.05)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.answers


@contextlib.contextmanager
def pollers(a: Host, b: Host, port: int) -> Iterator[tuple[Poller, Poller]]:
    pa, pb = Poller(a, port), Poller(b, port)
    try:
        yield pa, pb
    finally:
        pa.stop()
        pb.stop()


def checkpoint_polled(host: Host, name: str) -> str:
    """A checkpoint of a server the pollers keep asking: CRIU refuses a dump that finds a
    connection not yet accepted ("In-flight connection"), so a later try is taken."""
    for attempt in range(5):
        try:
            return host.checkpoint(name)
        except AssertionError as e:
            if "In-flight connection" not in str(e) or attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def assert_never_both(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> None:
    """No answer of A's copy overlaps one of B's: A's last ends before B's first begins."""
    assert a and b, (len(a), len(b))
    overlapping = [x for x in a if x[1] >= b[0][0]]
    assert not overlapping, (
        f"A's copy answered {len(overlapping)} times after B's began answering "
        f"(B first asked at {b[0][0]:.2f}, A's last answer at {a[-1][1]:.2f})"
    )


def serving(net: Network, port: int) -> tuple[str, Host, Host]:
    """Two hosts with failover on one bucket (returned first); A runs `web`, serving `port`."""
    bucket = net.moto.create_bucket(f"ckpt-fleet-x-{os.getpid()}-{port}")
    a = fleet(net, bucket, "a", True, None)
    a.start()
    b = fleet(net, bucket, "b", True, a.key_file)
    b.start()
    a.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
    a.serve(port, 3)
    return bucket, a, b


def started_copy(net: Network, port: int) -> tuple[Host, Host]:
    """`serving`, with a checkpoint of `web` committed (B can take it over)."""
    _, a, b = serving(net, port)
    committed_on(b, "web", a.checkpoint("web"))
    return a, b


def test_a_paused_daemons_workload_never_answers_beside_the_new_owners(workdir: Path) -> None:
    """SIGSTOP of A's daemon alone (a stall, a debugger): its workload is another process and
    runs on; the deadman, a process of its own, stops it at the lease's deadline."""
    port = 18086
    with Network(workdir) as net:
        a, b = started_copy(net, port)
        assert a.proc is not None
        with pollers(a, b, port) as (pa, pb):
            paused = time.monotonic()
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                until("B answers", lambda: pb.answers, 40, b)
                time.sleep(2)  # both copies would be answering now
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            until("A knows web is B's", lambda: a.status("web")["state"] == "elsewhere", 30, a)
            time.sleep(1)
        assert_never_both(pa.answers, pb.answers)
        last_a = pa.answers[-1][1]
        assert last_a <= paused + TTL - SKEW + 0.5, (last_a - paused, a.log.read_text()[-3000:])
        assert "deadman: the lease of web" in a.log.read_text()
        print(f"\npaused daemon: A's last answer {last_a - paused:.2f}s after the pause, "
              f"B's first {pb.answers[0][1] - paused:.2f}s")  # fmt: skip


def test_a_partitioned_owner_stops_its_copy_by_its_deadline_and_b_takes_over(
    workdir: Path,
) -> None:
    """A's traffic to the bucket is dropped (iptables in A's network namespace): its renewals
    hang in the retrying layer; the watchdog stops A's copy at the deadline all the same, B
    takes over, and when the link is back A's daemon kills its copy for good. A really
    commits meanwhile (a checkpoint into its spool before its deadline, uploaded once the
    link is back): that checkpoint never exists, on B or on A once the workload is back
    there (generation 3), not even when named (docs/fleet.md, R4)."""
    port = 18087
    with Network(workdir) as net:
        a, b = started_copy(net, port)
        bucket = f"ckpt-fleet-x-{os.getpid()}-{port}"
        rule = ["-d", net.gateway, "-p", "tcp", "--dport", str(net.moto.port), "-j", "DROP"]
        with pollers(a, b, port) as (pa, pb):
            cut = time.monotonic()
            a.run("iptables", "-I", "OUTPUT", *rule).check_returncode()
            stale = checkpoint_polled(a, "web")  # into A's spool, under a lease A still holds
            try:
                until("B answers", lambda: pb.answers, 40, b)
                time.sleep(2)
            finally:
                r = a.run("iptables", "-D", "OUTPUT", *rule)
                assert r.returncode == 0, r.stderr
            until("A knows web is B's", lambda: a.status("web")["state"] == "elsewhere", 90, a)
        assert_never_both(pa.answers, pb.answers)
        last_a = pa.answers[-1][1]
        assert last_a <= cut + TTL - SKEW + 0.5, (last_a - cut, a.log.read_text()[-3000:])
        assert not a.connects(port)
        assert b.http_get(port).isdigit()
        print(f"\npartition: A's last answer {last_a - cut:.2f}s after the cut, "
              f"B's first {pb.answers[0][1] - cut:.2f}s")  # fmt: skip

        # A's stale checkpoint reaches the bucket, and the head refuses it.
        def uploaded() -> bool:
            return any(stale in k for k in net.moto.keys(bucket, "ckpt/manifests/web/"))

        until("A's stale manifest is uploaded", uploaded, 60, a)
        until("A's head record refused", lambda: "is not committed" in a.log.read_text(), 60, a)
        for host in (b, a):
            assert stale not in [c["id"] for c in host.json("list", "web")]
        refused = b.cli("rollback", "web", "--to", stale, check=False)
        assert refused.returncode != 0 and "never restored" in refused.stderr, refused.stderr
        b.cli("migrate", "web", "--to", "a")  # generation 3, on A again
        until("A runs web again", lambda: a.status("web")["state"] == "running", 60, a)
        assert stale not in [c["id"] for c in a.json("list", "web")]
        refused = a.cli("rollback", "web", "--to", stale, check=False)
        assert refused.returncode != 0 and "never restored" in refused.stderr, refused.stderr


def test_a_frozen_host_stops_its_copy_the_moment_it_runs_again(workdir: Path) -> None:
    """Host.freeze: the daemon, the deadman and the workload all SIGSTOPped (a machine that
    hangs) past the TTL; B takes over. The copy on A was paused too; when A runs again its
    deadline has passed and the deadman and the watchdog stop the copy at once. The one thing
    no local clock can prevent: a request already queued at A's copy may be answered in that
    instant (the test thaws the workload before the daemon). A request sent 0.25 s after the
    thaw is never answered by A."""
    port = 18088
    with Network(workdir) as net:
        a, b = started_copy(net, port)
        with pollers(a, b, port) as (pa, pb):
            a.freeze()
            try:
                until("B answers", lambda: pb.answers, 40, b)
                time.sleep(2)
            finally:
                a.thaw()
            thawed = time.monotonic()
            until("A knows web is B's", lambda: a.status("web")["state"] == "elsewhere", 30, a)
            time.sleep(1)
        late = [x for x in pa.answers if x[0] > thawed + 0.25]
        assert not late, f"A's copy answered {len(late)} requests sent after it ran again"
        in_flight = [x for x in pa.answers if x[1] >= pb.answers[0][0]]
        assert len(in_flight) <= 1, in_flight
        assert not a.connects(port) and b.http_get(port).isdigit()


def test_a_copy_stopped_by_the_deadman_runs_on_when_the_lease_proves_still_ours(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    """No failover, one host: its daemon paused past the deadline has its copy stopped (it
    cannot know nobody took over); once the daemon runs again and renews the lease, which
    nobody changed, the copy resumes with its state."""
    d = fleet_host(workdir, moto, bucket, "host-a")
    port = free_port()
    try:
        d.start()
        d.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        http_get(port)
        root = d.pid("web")
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(TTL)  # past the deadline (TTL - skew after the last renewal)
            assert process.state(root) == "T"  # stopped by the deadman
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert http_get(port, timeout=15) == "2"  # its count, kept
        assert d.status("web")["state"] == "running"
        assert "deadman: the lease of web" in d.log.read_text()
    finally:
        d.stop()
