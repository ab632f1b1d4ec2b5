"""Metrics of restore drills (checkpointer/engine/drills.py): drills by result, how long they
take, and how old each workload's newest verified checkpoint is, which the alert
CheckpointerNoVerifiedCheckpoint (configs/prometheus-alerts.yaml) compares with the drill
interval. Timestamps, not ages, as the other gauges: Prometheus computes the age."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from checkpointer.engine import Workload, WorkloadState

RESULTS = ("verified", "failed", "error")
_SECONDS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class DrillCounters:
    """Counted as drills end (Metrics.drill_done)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.drills = Counter(
            "checkpointer_drills",
            "Restore drills by result: verified, failed (the checkpoint is marked bad), error "
            "(the drill could not tell: storage down, no sandbox)",
            ["workload", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "checkpointer_drill_duration_seconds",
            "Whole restore drill: reading the checkpoint, CRIU in the sandbox, teardown",
            ["workload"],
            buckets=_SECONDS,
            registry=registry,
        )

    def added(self, workload: str) -> None:
        """Series at 0 from the start (an alert on increase() needs them)."""
        for result in RESULTS:
            self.drills.labels(workload, result)
        self.duration.labels(workload)

    def done(self, workload: str, result: str, duration: float) -> None:
        self.drills.labels(workload, result).inc()
        self.duration.labels(workload).observe(duration)


class Workloads(Protocol):
    def workloads(self) -> list[Workload]: ...


class Holds(Protocol):
    def holds(self, name: str) -> bool: ...


class DrillCollector(Collector):
    """Gauges read at scrape time from the workloads' records."""

    def __init__(self, source: Workloads, fleet: Holds | None = None) -> None:
        self.source = source
        self.fleet = fleet

    def collect(self) -> Iterator[Any]:
        verified = GaugeMetricFamily(
            "checkpointer_verified_checkpoint_timestamp_seconds",
            "When the newest checkpoint a restore drill verified (and nothing marked bad "
            "since) was taken; absent when there is none",
            labels=["workload"],
        )
        interval = GaugeMetricFamily(
            "checkpointer_drill_interval_seconds",
            "drill.every of a workload running here with scheduled drills and a checkpoint to "
            "drill (absent: none due here: drills off, not running, another host's, none yet)",
            labels=["workload"],
        )
        for w in self.source.workloads():
            proven = w.verified()
            if proven is not None:
                verified.add_metric([w.name], proven.created)
            runs_here = w.state is WorkloadState.RUNNING and w.alive()
            if self.fleet is not None and not self.fleet.holds(w.name):
                runs_here = False
            checkpointed = w.last_checkpoint is not None  # else the stale alert speaks
            if w.drill.every and runs_here and checkpointed and not w.kind.is_container:
                interval.add_metric([w.name], w.drill.every)
        yield from (verified, interval)
