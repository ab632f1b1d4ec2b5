"""The stale-checkpoint alert: due for every workload that runs here on a schedule (cron and
never checkpointed included), silent for one that exited or that another host runs. The rule
is evaluated by a real Prometheus against a real daemon: a failing cron job and an exited one
on one daemon; a workload migrated to another host of a fleet (tests/support/hosts.py), with
Prometheus scraping the host it left; and, at the collector, every state and lease case."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from checkpointer.daemon.metrics import EngineCollector
from checkpointer.daemon.scheduler import first_run_after
from checkpointer.engine.workload import Workload, WorkloadKind, WorkloadState
from tests.support import COUNTER, PROGRAMS, Daemon, Network, free_port, http_get, s3_config
from tests.support.prometheus import ALERTS, Prometheus, daemon_and_prometheus
from tests.test_fleet import FLEET

DUE = "checkpointer_checkpoint_due_timestamp_seconds"
STALE = "CheckpointerCheckpointStale"


def quick_rules(workdir: Path, slack: int) -> Path:
    """The shipped rules with the stale alert's 10 minutes of slack down to SLACK seconds and
    every `for:` to 1 s, so that an overdue checkpoint fires within seconds of being due."""
    text = ALERTS.read_text()
    assert f"{DUE} > 600" in text and f"alert: {STALE}" in text
    rules = workdir / "alerts.yaml"
    rules.write_text(
        re.sub(r"for: \S+", "for: 1s", text.replace(f"{DUE} > 600", f"{DUE} > {slack}"))
    )
    return rules


def stale_alerts(prom: Prometheus) -> dict[str | None, str]:
    """Workload -> state (pending, firing) of the stale alerts Prometheus has now."""
    alerts = prom.api("alerts")["data"]["alerts"]
    return {
        a["labels"].get("workload"): a["state"] for a in alerts if a["labels"]["alertname"] == STALE
    }


@pytest.fixture
def stale_stack(workdir: Path) -> Iterator[tuple[Daemon, Prometheus]]:
    rules = quick_rules(workdir, 3)
    d = Daemon(workdir)
    with daemon_and_prometheus(d, rules) as prom:
        yield d, prom


def test_stale_alert_fires_for_failing_cron_and_never_for_an_exited_workload(
    stale_stack: tuple[Daemon, Prometheus],
) -> None:
    d, prom = stale_stack
    py = sys.executable
    # Every checkpoint fails (an established TCP connection); on cron, never checkpointed.
    d.cli("run", "nightly", "--cron", "* * * * *", "--", py, str(PROGRAMS / "tcp_holder.py"))
    # Exits 0 at once: finished, nothing is due for it ever.
    d.cli("run", "batch", "--cron", "* * * * *", "--", py, "-c", "pass")
    # Healthy, every 1 s: its checkpoint is never overdue by 3 s.
    port = free_port()
    d.cli("run", "web", "--every", "1s", "--", py, str(COUNTER), str(port))
    http_get(port)
    d.wait_for("batch", lambda st: st["state"] == "exited")

    # The cron job's first run is at the next full minute: the alert fires 3 s + 1 s later.
    deadline = time.monotonic() + 90
    while True:
        stale = stale_alerts(prom)
        if stale.get("nightly") == "firing":
            break
        assert time.monotonic() < deadline, prom.api("alerts")
        time.sleep(1)
    assert "batch" not in stale and "web" not in stale, stale
    series = prom.api("query", query=DUE)["data"]["result"]
    assert {s["metric"]["workload"] for s in series} == {"nightly", "web"}, series
    assert d.status("nightly")["last_checkpoint"] is None  # it did try, and failed
    failed = prom.api("query", query='checkpointer_checkpoints_total{workload="nightly",'
                      'result="failure"}')["data"]["result"]  # fmt: skip
    assert failed and float(failed[0]["value"][1]) >= 1


def test_stale_alert_stays_silent_on_the_host_a_workload_migrated_from(workdir: Path) -> None:
    """Prometheus scrapes host A only. `web` checkpoints every 3 s on A, then migrates to B:
    long past when A's schedule would have it overdue, A never alerts for it, while `stuck`
    (on A, every checkpoint fails) fires on A in the same time: the alert works there."""
    every, slack, port = 3, 10, 18094
    metrics = 9467  # A's own network namespace: nothing else listens there
    rules = quick_rules(workdir, slack)
    py = sys.executable
    with Network(workdir) as net, contextlib.ExitStack() as stack:
        bucket = net.moto.create_bucket(f"ckpt-stale-{os.getpid()}")
        extra = s3_config(net.moto, bucket) + f"metrics:\n  address: 0.0.0.0\n  port: {metrics}\n"
        a = net.add_host("a", extra + FLEET.format(name="a", failover="false"))
        a.start()
        b = net.add_host(
            "b",
            s3_config(net.moto, bucket) + FLEET.format(name="b", failover="false"),
            key_file=a.key_file,
        )
        b.start()
        prom = Prometheus(workdir, metrics, rules, target_host=a.address)
        stack.callback(prom.stop)
        a.cli("run", "web", "--every", f"{every}s", "--", py, str(COUNTER), str(port))
        assert a.serve(port, 3) == "3"
        a.cli("run", "stuck", "--every", f"{every}s", "--", py, str(PROGRAMS / "tcp_holder.py"))

        # Prometheus sees web's due gauge on A, advancing with its good checkpoints.
        def due_of_web() -> float | None:
            got = prom.api("query", query=f'{DUE}{{workload="web"}}')["data"]["result"]
            return float(got[0]["value"][1]) if got else None

        deadline = time.monotonic() + 60
        first = None
        while (due := due_of_web()) is None or first is None or due <= first:
            first = first or due
            assert time.monotonic() < deadline, (first, due, a.log.read_text()[-3000:])
            time.sleep(0.5)
        assert a.status("web")["last_checkpoint"] is not None

        r = a.json("migrate", "web", "--to", "b")
        assert r["to"] == "b"
        moved = time.time()
        b.wait_for("web", lambda st: st["state"] == "running", timeout=30)
        assert b.http_get(port) == "4"  # its count + 1: it runs on B now
        assert a.status("web")["state"] == "elsewhere"

        # Were A still exporting web's gauge, its last good checkpoint there (the migration's
        # final one at the latest) would make it overdue by `moved + every` (+ jitter: none),
        # firing `slack` + 1 s later. Watch until 15 s past that; stuck fires meanwhile.
        overdue = max(due, moved + every) + slack + 1
        fired = None
        while time.time() < overdue + 15 or fired is None:
            stale = stale_alerts(prom)
            assert "web" not in stale, (stale, prom.api("query", query=f'{DUE}{{workload="web"}}'))
            if stale.get("stuck") == "firing" and fired is None:
                fired = time.time()
            assert time.time() < overdue + 60, prom.api("alerts")
            time.sleep(1)
        assert a.status("stuck")["last_checkpoint"] is None  # it tried, and failed
        assert due_of_web() is None  # the series went stale on A at its next scrape
        assert a.status("stuck")["state"] == "running"
        print(
            f"\nstuck fired {fired - moved:.1f}s after the migration; web silent for "
            f"{time.time() - overdue:.1f}s past when it would have been overdue"
        )


@dataclass
class Fleet:
    """A fleet view in which this host holds only `held`."""

    held: set[str]
    renewal_failures: int = 0
    unowned: int = 0
    clock_offset: float | None = None

    def holds(self, name: str) -> bool:
        return name in self.held


@dataclass
class Workloads:
    items: list[Workload]

    def workloads(self) -> list[Workload]:
        return self.items


def test_due_is_exported_only_for_workloads_running_here_on_a_schedule() -> None:
    """Moved away (elsewhere), lease held by another host, exited, stopped, manual: no series.
    Running here: due one period after the last success (cron: its next time after it)."""
    import os

    me = os.getpid()  # a live process for the running ones
    last = datetime(2026, 1, 5, 10, 0, 30, tzinfo=UTC).timestamp()

    def w(name: str, state: WorkloadState, **kw: object) -> Workload:
        return Workload(name, WorkloadKind.ADOPTED, state=state, pid=me, **kw)  # type: ignore[arg-type]

    items = [
        w("cron", WorkloadState.RUNNING, cron="*/5 * * * *", last_checkpoint_at=last),
        w("every", WorkloadState.RUNNING, every=60.0, jitter=5.0, last_checkpoint_at=last),
        w("fresh", WorkloadState.RUNNING, every=60.0),
        w("moved", WorkloadState.ELSEWHERE, every=60.0, last_checkpoint_at=last),
        w("theirs", WorkloadState.RUNNING, every=60.0, last_checkpoint_at=last),
        w("exited", WorkloadState.EXITED, cron="* * * * *", last_checkpoint_at=last),
        w("stopped", WorkloadState.STOPPED, every=60.0),
        w("manual", WorkloadState.RUNNING),
    ]
    for x in items:
        x.started = None  # compare by PID only
    registry = CollectorRegistry()
    held = {x.name for x in items} - {"theirs"}
    registry.register(EngineCollector(Workloads(items), None, 0, Fleet(held)))
    t0 = time.time()
    text = generate_latest(registry).decode()
    due = {
        m.group(1): float(m.group(2))
        for m in re.finditer(rf'^{DUE}{{workload="([^"]+)"}} (\S+)$', text, re.M)
    }
    assert set(due) == {"cron", "every", "fresh"}, text
    assert due["cron"] == datetime(2026, 1, 5, 10, 5, tzinfo=UTC).timestamp()
    assert due["every"] == last + 65
    assert t0 + 60 <= due["fresh"] <= time.time() + 60
    since = datetime.fromtimestamp(last, UTC)
    assert first_run_after(since, None, None) is None
