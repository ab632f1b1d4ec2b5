"""Prometheus metrics of the daemon (prometheus-client, single process, its own registry).

Counters and histograms are updated by the engine, supervisor and storage wrappers as things
happen; gauges that describe current state (workload up, state, last success, spool backlog)
are computed at scrape time from the engine, so they can never go stale.
Buckets are set per metric: the client's defaults stop at 10 s, too short for checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from checkpointer.criu import DumpStats, RestoreStats
from checkpointer.daemon.drill_metrics import DrillCounters
from checkpointer.daemon.scheduler import first_run_after
from checkpointer.engine import Workload, WorkloadState
from checkpointer.engine.states import RestoreReason
from checkpointer.errors import ConfigError
from storage.backends.spooled import SpooledBlobStore

STATES = [s for s in WorkloadState if s is not WorkloadState.GONE]
# Every reason a restore is counted under, pre-set to 0 so a rate over it is defined before
# the first restore; LAZY is no restore of its own (a lazy restore's later failure, in the
# history only).
RESTORE_REASONS = tuple(r for r in RestoreReason if r is not RestoreReason.LAZY)
# `retry`: failed for a reason outside the checkpoint (storage down, a PID taken) and tried
# again by the daemon; only `failure` pages (configs/prometheus-alerts.yaml).
RESTORE_RESULTS = ("success", "failure", "retry")
_SECONDS_LONG = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_SECONDS_PAUSE = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PAGES = (100, 1_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        w = ["workload"]
        self.checkpoints = Counter(
            "checkpointer_checkpoints", "Checkpoint attempts by result", [*w, "result"], registry=r
        )
        self.checkpoint_failures = Counter(
            "checkpointer_checkpoint_failures",
            "Failed checkpoints by cause",
            [*w, "reason"],
            registry=r,
        )
        self.duration = Histogram(
            "checkpointer_checkpoint_duration_seconds",
            "Whole checkpoint: dump, chunking, storing",
            w,
            buckets=_SECONDS_LONG,
            registry=r,
        )
        self.frozen = Histogram(
            "checkpointer_checkpoint_frozen_seconds",
            "Time the workload was frozen (CRIU frozen_time)",
            w,
            buckets=_SECONDS_PAUSE,
            registry=r,
        )
        self.freezing = Histogram(
            "checkpointer_checkpoint_freezing_seconds",
            "CRIU freezing_time",
            w,
            buckets=_SECONDS_PAUSE,
            registry=r,
        )
        self.memdump = Histogram(
            "checkpointer_checkpoint_memdump_seconds",
            "CRIU memdump_time",
            w,
            buckets=_SECONDS_PAUSE,
            registry=r,
        )
        self.memwrite = Histogram(
            "checkpointer_checkpoint_memwrite_seconds",
            "CRIU memwrite_time",
            w,
            buckets=_SECONDS_PAUSE,
            registry=r,
        )
        self.pages_scanned = Histogram(
            "checkpointer_checkpoint_scanned_pages",
            "CRIU pages_scanned per dump",
            w,
            buckets=_PAGES,
            registry=r,
        )
        self.pages_written = Histogram(
            "checkpointer_checkpoint_written_pages",
            "CRIU pages_written per dump",
            w,
            buckets=_PAGES,
            registry=r,
        )
        self.image_bytes = Gauge(
            "checkpointer_checkpoint_image_bytes",
            "Size of the last checkpoint's image",
            w,
            registry=r,
        )
        self.image_bytes_total = Counter(
            "checkpointer_image_bytes", "Bytes of every checkpoint image taken", w, registry=r
        )
        self.stored_bytes = Counter(
            "checkpointer_stored_bytes",
            "Bytes newly written to the repository (after dedup and compression)",
            w,
            registry=r,
        )
        self.restores = Counter(
            "checkpointer_restores",
            "Restores by reason (crash, boot, rollback, manual, ...) and result (success, "
            "failure, retry: failed outside the checkpoint and tried again)",
            [*w, "reason", "result"],
            registry=r,
        )
        self.restore_duration = Histogram(
            "checkpointer_restore_duration_seconds",
            "Whole restore: download, verify, CRIU",
            w,
            buckets=_SECONDS_LONG,
            registry=r,
        )
        self.restore_criu = Histogram(
            "checkpointer_restore_criu_seconds",
            "CRIU restore_time",
            w,
            buckets=_SECONDS_PAUSE,
            registry=r,
        )
        self.restore_forking = Histogram(
            "checkpointer_restore_forking_seconds",
            "CRIU forking_time",
            w,
            buckets=_SECONDS_PAUSE,
            registry=r,
        )
        self.restore_pages = Histogram(
            "checkpointer_restore_restored_pages",
            "CRIU pages_restored",
            w,
            buckets=_PAGES,
            registry=r,
        )
        self.storage_ops = Counter(
            "checkpointer_storage_operations", "Backend operations", ["op"], registry=r
        )
        self.storage_errors = Counter(
            "checkpointer_storage_errors",
            "Backend errors (each failed attempt)",
            ["op"],
            registry=r,
        )
        self.storage_retries = Counter(
            "checkpointer_storage_retries", "Backend retries", ["op"], registry=r
        )
        self.uploaded_bytes = Counter(
            "checkpointer_uploaded_bytes", "Bytes the spool uploaded to object storage", registry=r
        )
        self.spool_dropped = Counter(
            "checkpointer_spool_dropped_checkpoints",
            "Checkpoints dropped from a full spool before upload",
            registry=r,
        )
        self.retention_deleted = Counter(
            "checkpointer_retention_deleted", "Checkpoints removed by retention", w, registry=r
        )
        self.gc_deleted_packs = Counter(
            "checkpointer_gc_deleted_packs", "Packs removed by garbage collection", registry=r
        )
        self.schedule_skipped = Counter(
            "checkpointer_schedule_skipped",
            "Scheduled checkpoints not run, by reason (overlap, missed)",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge(
            "checkpointer_build_info", "Versions", ["version", "criu_version"], registry=r
        )
        for op in ("check", "put", "get", "exists", "list", "delete"):
            # Series exist from the start: rate() of a counter never seen has no data.
            self.storage_ops.labels(op)
            self.storage_errors.labels(op)
            self.storage_retries.labels(op)
        for reason in ("overlap", "missed"):
            self.schedule_skipped.labels(reason)
        self.migrations = Counter(
            "checkpointer_migrations", "Migrations to another host by result", [*w, "result"],
            registry=r,
        )  # fmt: skip
        self.migration_duration = Histogram(
            "checkpointer_migration_duration_seconds",
            "Final checkpoint, upload and hand-over of a migration (on the source host)",
            w,
            buckets=_SECONDS_LONG,
            registry=r,
        )
        self.cpu_incompatible = Counter(
            "checkpointer_cpu_incompatible",
            "Checkpoints this host refused to take over: its CPU lacks features they use",
            w,
            registry=r,
        )

        self.drill = DrillCounters(r)  # restore drills (daemon/drill_metrics.py)

    # -- events (checkpointer.engine.events.Events) -------------------------------------

    def workload_added(self, workload: str) -> None:
        """Create the workload's labelled counters at 0. An alert on `increase(...) > 0`
        cannot fire for a series born at 1 (its samples are all 1), nor can a dashboard show
        anything but "No data" for a series that does not exist yet."""
        for result in ("success", "failure"):
            self.checkpoints.labels(workload, result)
        for result in RESTORE_RESULTS:
            for reason in RESTORE_REASONS:
                self.restores.labels(workload, reason, result)
        self.retention_deleted.labels(workload)
        self.stored_bytes.labels(workload)
        self.image_bytes_total.labels(workload)
        for result in ("success", "failure"):
            self.migrations.labels(workload, result)
        self.cpu_incompatible.labels(workload)
        self.drill.added(workload)
        # Histograms too: the dashboard's duration panels show 0, not "No data", until the
        # first checkpoint or restore of the workload.
        for histogram in (
            self.duration,
            self.frozen,
            self.restore_duration,
            self.restore_criu,
            self.migration_duration,
        ):
            histogram.labels(workload)

    def migration_done(self, workload: str, ok: bool, duration: float | None = None) -> None:
        self.migrations.labels(workload, "success" if ok else "failure").inc()
        self.migrations.labels(workload, "failure" if ok else "success")
        if duration is not None:
            self.migration_duration.labels(workload).observe(duration)

    def drill_done(self, workload: str, result: str, duration: float) -> None:
        self.drill.done(workload, result, duration)

    def cpu_refused(self, workload: str) -> None:
        """checkpointer/engine/migration.py: a failover this host's CPU cannot take."""
        self.cpu_incompatible.labels(workload).inc()

    def retention_removed(self, workload: str) -> None:
        self.retention_deleted.labels(workload).inc()

    def spool_shed(self, checkpoints: int) -> None:
        self.spool_dropped.inc(checkpoints)

    def gc_collected(self, packs: int) -> None:
        self.gc_deleted_packs.inc(packs)

    def checkpoint_ok(
        self, workload: str, duration: float, stats: DumpStats, image: int, stored: int
    ) -> None:
        self.checkpoints.labels(workload, "success").inc()
        self.checkpoints.labels(workload, "failure")
        self.duration.labels(workload).observe(duration)
        self.frozen.labels(workload).observe(stats.frozen_time)
        self.freezing.labels(workload).observe(stats.freezing_time)
        self.memdump.labels(workload).observe(stats.memdump_time)
        self.memwrite.labels(workload).observe(stats.memwrite_time)
        self.pages_scanned.labels(workload).observe(stats.pages_scanned)
        self.pages_written.labels(workload).observe(stats.pages_written)
        self.image_bytes.labels(workload).set(image)
        self.image_bytes_total.labels(workload).inc(image)
        self.stored_bytes.labels(workload).inc(stored)

    def checkpoint_failed(self, workload: str, reason: str) -> None:
        self.checkpoints.labels(workload, "failure").inc()
        self.checkpoints.labels(workload, "success")
        self.checkpoint_failures.labels(workload, reason).inc()

    def restore_done(
        self,
        workload: str,
        reason: str,
        ok: bool,
        duration: float | None = None,
        stats: RestoreStats | None = None,
    ) -> None:
        self.restores.labels(workload, reason, "success" if ok else "failure").inc()
        if duration is not None:
            self.restore_duration.labels(workload).observe(duration)
        if stats is not None:
            self.restore_criu.labels(workload).observe(stats.restore_time)
            self.restore_forking.labels(workload).observe(stats.forking_time)
            self.restore_pages.labels(workload).observe(stats.pages_restored)

    def restore_retried(self, workload: str, reason: str) -> None:
        self.restores.labels(workload, reason, "retry").inc()

    def serve(self, address: str, port: int) -> None:
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            raise ConfigError(
                f"metrics: cannot listen on {address}:{port} ({e.strerror or e}): set "
                "`metrics.port` to a free port (or `metrics.address`), or `metrics.enabled: "
                "false`"
            ) from e


class Workloads(Protocol):
    """What the scrape-time gauges read: the registered workloads."""

    def workloads(self) -> list[Workload]: ...


class FleetView(Protocol):
    """What the fleet gauges read (checkpointer/daemon/fleet.py)."""

    renewal_failures: int
    unowned: int
    clock_offset: float | None

    def holds(self, name: str) -> bool: ...


class EngineCollector(Collector):
    """Gauges read at scrape time from the engine and the spool."""

    def __init__(
        self,
        source: Workloads,
        spool: SpooledBlobStore | None,
        limit: int,
        fleet: FleetView | None = None,
    ) -> None:
        self.source = source
        self.spool = spool
        self.limit = limit
        self.fleet = fleet
        # When this daemon first saw each workload never checkpointed: its first checkpoint
        # is due one schedule period after that (a restart of the daemon starts it again).
        self._first_seen: dict[str, float] = {}

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "checkpointer_workload_up", "1 if the tree runs", labels=["workload"]
        )
        state = GaugeMetricFamily(
            "checkpointer_workload_state", "1 for the current state", labels=["workload", "state"]
        )
        last = GaugeMetricFamily(
            "checkpointer_last_success_timestamp_seconds",
            "When the last checkpoint succeeded",
            labels=["workload"],
        )
        interval = GaugeMetricFamily(
            "checkpointer_schedule_expected_interval_seconds",
            "The workload's checkpoint interval (0: cron or manual)",
            labels=["workload"],
        )
        due = GaugeMetricFamily(
            "checkpointer_checkpoint_due_timestamp_seconds",
            "When the first scheduled checkpoint after the last good one was due at the latest "
            "(or, never checkpointed, after this daemon took the workload on); only for "
            "workloads running here on a schedule. In the past: that checkpoint has not "
            "succeeded (the stale alert)",
            labels=["workload"],
        )
        now = time.time()
        workloads = self.source.workloads()
        for w in workloads:
            alive = w.alive()
            up.add_metric([w.name], 1.0 if alive else 0.0)
            current = w.state
            if w.state is WorkloadState.RUNNING and not alive:
                current = WorkloadState.CRASHED  # the reaper is about to say so
            for s in STATES:
                state.add_metric([w.name, s], 1.0 if s == current else 0.0)
            if w.last_checkpoint_at:
                last.add_metric([w.name], w.last_checkpoint_at)
            interval.add_metric([w.name], w.every or 0.0)
            since = w.last_checkpoint_at or self._first_seen.setdefault(w.name, now)
            # Exited, stopped, crashed (the restore alerts speak then) or owned by another
            # host of the fleet: nothing is due here.
            runs_here = current is WorkloadState.RUNNING and (
                self.fleet is None or self.fleet.holds(w.name)
            )
            when = first_run_after(datetime.fromtimestamp(since, UTC), w.every, w.cron, w.jitter)
            if runs_here and when is not None:
                due.add_metric([w.name], when.timestamp())
        for gone in self._first_seen.keys() - {w.name for w in workloads}:
            del self._first_seen[gone]
        yield from (up, state, last, interval, due)
        if self.fleet is not None:
            held = GaugeMetricFamily(
                "checkpointer_lease_held",
                "1 if this host holds the workload's lease (fleet)",
                labels=["workload"],
            )
            for w in self.source.workloads():
                held.add_metric([w.name], 1.0 if self.fleet.holds(w.name) else 0.0)
            failures = CounterMetricFamily(
                "checkpointer_lease_renewal_failures", "Lease renewals that failed (fleet)"
            )
            failures.add_metric([], float(self.fleet.renewal_failures))
            unowned = GaugeMetricFamily(
                "checkpointer_fleet_unowned_workloads",
                "Workloads whose lease expired and that no host took over (fleet)",
            )
            unowned.add_metric([], float(self.fleet.unowned))
            yield from (held, failures, unowned)
            if self.fleet.clock_offset is not None:
                offset = GaugeMetricFamily(
                    "checkpointer_clock_offset_seconds",
                    "The store's clock minus this host's, from its Date header (fleet; alert "
                    "beyond fleet.clock_skew)",
                )
                offset.add_metric([], self.fleet.clock_offset)
                yield offset
        spool = self.spool
        backlog = GaugeMetricFamily(
            "checkpointer_spool_backlog_bytes", "Bytes written locally and not yet uploaded"
        )
        pending = GaugeMetricFamily(
            "checkpointer_spool_backlog_objects", "Objects written locally and not yet uploaded"
        )
        online = GaugeMetricFamily(
            "checkpointer_storage_online", "0 while object storage is unreachable"
        )
        if spool is not None:
            backlog.add_metric([], spool.backlog_bytes())
            pending.add_metric([], len(spool.pending_keys()))
            online.add_metric([], 1.0 if spool.online else 0.0)
        else:
            backlog.add_metric([], 0.0)
            pending.add_metric([], 0.0)
            online.add_metric([], 1.0)
        limit = GaugeMetricFamily(
            "checkpointer_spool_limit_bytes",
            "spool_max_bytes: over it, un-uploaded checkpoints are dropped",
        )
        limit.add_metric([], float(self.limit))
        yield from (backlog, pending, online, limit)
