"""Metrics, the Grafana dashboard and the alert rules, against a real Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import COUNTER, PROGRAMS, ROOT, Daemon, free_port, http_get, kill_tree
from tests.support.prometheus import ALERTS, Prometheus, daemon_and_prometheus

DASHBOARD = ROOT / "grafana" / "checkpointer-dashboard.json"


def scrape(d: Daemon) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} from the daemon's /metrics."""
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m: dict[str, Any], name: str, **labels: str) -> float:
    for key, v in m.get(name, {}).items():
        if all((k, labels[k]) in key for k in labels):
            return float(v)
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_after_checkpoint_and_restore(counter: tuple[Daemon, int]) -> None:
    d, port = counter
    d.checkpoint("web")
    d.checkpoint("web")
    kill_tree(d.pid("web"))
    d.cli("restore", "web")
    http_get(port)
    m = scrape(d)
    w = {"workload": "web"}
    assert value(m, "checkpointer_checkpoints_total", result="success", **w) == 2
    assert value(m, "checkpointer_checkpoints_total", result="failure", **w) == 0
    frozen = value(m, "checkpointer_checkpoint_frozen_seconds_sum", **w)
    duration = value(m, "checkpointer_checkpoint_duration_seconds_sum", **w)
    assert 0 < frozen < duration
    assert value(m, "checkpointer_checkpoint_frozen_seconds_count", **w) == 2
    assert value(m, "checkpointer_checkpoint_image_bytes", **w) > 1_000_000
    image_total = value(m, "checkpointer_image_bytes_total", **w)
    stored = value(m, "checkpointer_stored_bytes_total", **w)
    assert 0 < stored < image_total  # the second checkpoint deduplicated
    assert value(m, "checkpointer_checkpoint_written_pages_count", **w) == 2
    assert value(m, "checkpointer_restores_total", reason="manual", result="success", **w) == 1
    assert (
        0
        < value(m, "checkpointer_restore_criu_seconds_sum", **w)
        < value(m, "checkpointer_restore_duration_seconds_sum", **w)
    )
    assert value(m, "checkpointer_workload_up", **w) == 1
    assert value(m, "checkpointer_workload_state", state="running", **w) == 1
    assert value(m, "checkpointer_workload_state", state="failed", **w) == 0
    assert time.time() - 60 < value(m, "checkpointer_last_success_timestamp_seconds", **w)
    assert value(m, "checkpointer_storage_operations_total", op="put") > 0
    assert value(m, "checkpointer_storage_errors_total", op="put") == 0
    assert value(m, "checkpointer_build_info", version="0.1.0") == 1


@pytest.fixture
def prometheus_stack(workdir: Path) -> Iterator[tuple[Daemon, Prometheus]]:
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus package is missing: `make test` installs it")
    # The shipped rules, with every `for:` shortened so that a forced condition fires now.
    rules = workdir / "alerts.yaml"
    rules.write_text(re.sub(r"for: \S+", "for: 1s", ALERTS.read_text()))
    d = Daemon(workdir)
    with daemon_and_prometheus(d, rules) as prom:
        yield d, prom


def test_dashboard_and_alerts_against_a_real_prometheus(
    prometheus_stack: tuple[Daemon, Prometheus],
) -> None:
    d, prom = prometheus_stack
    port = free_port()
    d.cli("run", "web", "--every", "1s", "--", sys.executable, str(COUNTER), str(port))
    # Checkpoints of this one always fail: an established TCP connection, no tcp_established.
    d.cli("run", "broken", "--every", "1s", "--", sys.executable, str(PROGRAMS / "tcp_holder.py"))
    http_get(port)
    d.wait_for("web", lambda st: st["last_checkpoint"] is not None)  # what the drill restores
    d.cli("drill", "web")  # the drill panels' data (checkpointer_verified_checkpoint_...)
    kill_tree(d.pid("web"))  # a crash: restored by the daemon (restores_total{reason=crash})
    http_get(port, timeout=20)

    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "workload"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    deadline = time.monotonic() + 30  # scrapes every second: data within a few
    for expr in exprs:
        q = expr.replace("$workload", ".*").replace("$__rate_interval", "30s")
        while True:
            r = prom.api("query", query=q)
            assert r["status"] == "success", (expr, r)
            if r["data"]["result"]:
                break
            assert time.monotonic() < deadline, f"panel query returned no data: {expr}"
            time.sleep(0.5)

    # promtool accepts the shipped rules as they are
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rules = prom.api("rules")["data"]["groups"][0]["rules"]
    assert len(rules) == 12 and all(r["health"] == "ok" for r in rules), rules
    for rule in rules:
        assert prom.api("query", query=rule["query"])["status"] == "success"

    deadline = time.monotonic() + 30
    while True:
        alerts = prom.api("alerts")["data"]["alerts"]
        firing = {
            (a["labels"]["alertname"], a["labels"].get("workload"))
            for a in alerts
            if a["state"] == "firing"
        }
        if ("CheckpointerCheckpointsFailing", "broken") in firing:
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(1)
    assert ("CheckpointerCheckpointsFailing", "web") not in firing
    assert not any(name == "CheckpointerDaemonDown" for name, _ in firing)


def test_a_tree_killed_while_it_is_dumped_is_a_crash_not_a_failed_checkpoint(
    daemon: Daemon,
) -> None:
    """A crash that lands while CRIU dumps the tree fails that dump; it is the crash the
    daemon restores, not a checkpoint failure (which would count and page as one)."""
    d, port = daemon, free_port()
    d.cli("run", "big", "--", sys.executable, str(PROGRAMS / "ballast_server.py"), str(port),
          "300")  # fmt: skip
    http_get(port, timeout=60)  # serving: the ballast is written
    pid, daemon_pid = d.pid("big"), d.proc.pid if d.proc else 0
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    t = threading.Thread(target=lambda: done.update(r=d.cli("checkpoint", "big", check=False)))
    t.start()
    deadline = time.monotonic() + 30
    while not any(
        "dump" in args and str(pid) in args for args in children_args(daemon_pid, "criu")
    ):
        assert time.monotonic() < deadline and t.is_alive(), "CRIU never started to dump"
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    r = done["r"]
    assert r.returncode != 0, r.stdout
    assert "exited while it was being checkpointed" in r.stdout + r.stderr
    m = scrape(d)
    failures = [
        v
        for k, v in m.get("checkpointer_checkpoints_total", {}).items()
        if ("workload", "big") in k and ("result", "failure") in k
    ]
    assert sum(failures) == 0, m.get("checkpointer_checkpoints_total")
    http_get(port, timeout=60)  # the daemon brought it back, as after any crash


def children_args(parent: int, name: str) -> list[list[str]]:
    """The command lines of `parent`'s children called `name`."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != parent:
                continue
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if args and Path(args[0]).name == name:
            out.append(args)
    return out
