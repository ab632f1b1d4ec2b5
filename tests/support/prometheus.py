"""A real Prometheus scraping a test's daemon every second, with the shipped alert rules (or a
test's copy of them), for the tests of metrics, dashboard panels and alerts."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon
from tests.support.net import free_port
from tests.support.paths import ROOT

ALERTS = ROOT / "configs" / "prometheus-alerts.yaml"


class Prometheus:
    """Prometheus on a free loopback port, its files in BASE; ready when built. It scrapes
    TARGET_HOST:TARGET_PORT (a host of tests/support/hosts.py: its address)."""

    def __init__(
        self, base: Path, target_port: int, rules: Path, target_host: str = "127.0.0.1"
    ) -> None:
        self.port = free_port()
        config = base / "prometheus.yml"
        config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{rules}]
scrape_configs:
  - job_name: checkpointer
    static_configs: [{{targets: ["{target_host}:{target_port}"]}}]
""")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)
                break
            except OSError:
                if self.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                self.stop()
                raise AssertionError("prometheus did not get ready within 30 s") from None

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            return json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def daemon_and_prometheus(d: Daemon, rules: Path) -> Iterator[Prometheus]:
    """Start D, then a Prometheus (in D's folder) that scrapes it with RULES; at the end stop
    both, also when either failed to start."""
    prom: Prometheus | None = None
    try:
        d.start()
        prom = Prometheus(d.base, d.metrics_port, rules)
        yield prom
    finally:
        if prom is not None:
            prom.stop()
        d.stop()
