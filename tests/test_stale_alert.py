"""The stale-checkpoint alert: due for every workload that runs here on a schedule (cron and
never checkpointed included), silent for one that exited or that another host runs. The rule
is evaluated by a real Prometheus against a real daemon; the fleet case by the collector."""

from __future__ import annotations

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
from tests.support import COUNTER, PROGRAMS, Daemon, free_port, http_get
from tests.support.prometheus import ALERTS, Prometheus, daemon_and_prometheus

DUE = "checkpointer_checkpoint_due_timestamp_seconds"


@pytest.fixture
def stale_stack(workdir: Path) -> Iterator[tuple[Daemon, Prometheus]]:
    # The shipped rule with its 10 minutes of slack down to 3 s and `for:` to 1 s, so that an
    # overdue checkpoint fires within seconds of being due.
    text = ALERTS.read_text()
    assert "checkpointer_checkpoint_due_timestamp_seconds > 600" in text
    rules = workdir / "alerts.yaml"
    rules.write_text(re.sub(r"for: \S+", "for: 1s", text.replace("_seconds > 600", "_seconds > 3")))
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
        alerts = prom.api("alerts")["data"]["alerts"]
        stale = {
            a["labels"].get("workload"): a["state"]
            for a in alerts
            if a["labels"]["alertname"] == "CheckpointerCheckpointStale"
        }
        if stale.get("nightly") == "firing":
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(1)
    assert "batch" not in stale and "web" not in stale, stale
    series = prom.api("query", query=DUE)["data"]["result"]
    assert {s["metric"]["workload"] for s in series} == {"nightly", "web"}, series
    assert d.status("nightly")["last_checkpoint"] is None  # it did try, and failed
    failed = prom.api("query", query='checkpointer_checkpoints_total{workload="nightly",'
                      'result="failure"}')["data"]["result"]  # fmt: skip
    assert failed and float(failed[0]["value"][1]) >= 1


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
