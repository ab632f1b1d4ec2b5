"""Generate grafana/checkpointer-dashboard.json: `python grafana/build_dashboard.py`.

Plain Python and JSON, no SDK: the panels are a readable table below, the JSON is checked in,
and tests/test_metrics.py runs every panel's PromQL against a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

W = '{workload=~"$workload"}'
R = "$__rate_interval"

# (title, unit, [(legend, expr)], kind, width, thresholds)
PANELS: list[tuple[str, str, list[tuple[str, str]], str, int, list[tuple[str, float]] | None]] = [
    (
        "Age of the last good checkpoint",
        "s",
        [("{{workload}}", f"time() - checkpointer_last_success_timestamp_seconds{W}")],
        "stat",
        12,
        [("green", 0), ("orange", 300), ("red", 900)],
    ),
    (
        "Workloads up",
        "none",
        [("{{workload}}", f"checkpointer_workload_up{W}")],
        "stat",
        12,
        [("red", 0), ("green", 1)],
    ),
    (
        "Checkpoints per second by result",
        "ops",
        [
            (
                "{{workload}} {{result}}",
                f"sum by (workload, result) (rate(checkpointer_checkpoints_total{W}[{R}]))",
            )
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Workload pause (CRIU frozen time) p50 / p99",
        "s",
        [
            (
                "p50 {{workload}}",
                "histogram_quantile(0.5, sum by (le, workload) "
                f"(rate(checkpointer_checkpoint_frozen_seconds_bucket{W}[{R}])))",
            ),
            (
                "p99 {{workload}}",
                "histogram_quantile(0.99, sum by (le, workload) "
                f"(rate(checkpointer_checkpoint_frozen_seconds_bucket{W}[{R}])))",
            ),
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Checkpoint duration p50 / p99",
        "s",
        [
            (
                "p50 {{workload}}",
                "histogram_quantile(0.5, sum by (le, workload) "
                f"(rate(checkpointer_checkpoint_duration_seconds_bucket{W}[{R}])))",
            ),
            (
                "p99 {{workload}}",
                "histogram_quantile(0.99, sum by (le, workload) "
                f"(rate(checkpointer_checkpoint_duration_seconds_bucket{W}[{R}])))",
            ),
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Image bytes vs bytes newly stored",
        "Bps",
        [
            (
                "image {{workload}}",
                f"sum by (workload) (rate(checkpointer_image_bytes_total{W}[{R}]))",
            ),
            (
                "stored {{workload}}",
                f"sum by (workload) (rate(checkpointer_stored_bytes_total{W}[{R}]))",
            ),
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Dedup: share of the image newly stored",
        "percentunit",
        [
            (
                "{{workload}}",
                f"sum by (workload) (rate(checkpointer_stored_bytes_total{W}[{R}])) / "
                f"sum by (workload) (rate(checkpointer_image_bytes_total{W}[{R}]))",
            )
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Restores by reason and result",
        "short",
        [
            (
                "{{workload}} {{reason}} {{result}}",
                f"sum by (workload, reason, result) (increase(checkpointer_restores_total{W}[1h]))",
            )
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Restore duration p50 / p99",
        "s",
        [
            (
                "p50 {{workload}}",
                "histogram_quantile(0.5, sum by (le, workload) "
                f"(rate(checkpointer_restore_duration_seconds_bucket{W}[1h])))",
            ),
            (
                "p99 {{workload}}",
                "histogram_quantile(0.99, sum by (le, workload) "
                f"(rate(checkpointer_restore_duration_seconds_bucket{W}[1h])))",
            ),
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Age of the newest checkpoint a restore drill verified",
        "s",
        [("{{workload}}", f"time() - checkpointer_verified_checkpoint_timestamp_seconds{W}")],
        "stat",
        12,
        [("green", 0), ("orange", 86400), ("red", 172800)],
    ),
    (
        "Restore drills by result",
        "short",
        [
            (
                "{{workload}} {{result}}",
                f"sum by (workload, result) (increase(checkpointer_drills_total{W}[1h]))",
            )
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Storage errors and retries per second",
        "ops",
        [
            ("errors {{op}}", f"sum by (op) (rate(checkpointer_storage_errors_total[{R}]))"),
            ("retries {{op}}", f"sum by (op) (rate(checkpointer_storage_retries_total[{R}]))"),
        ],
        "timeseries",
        12,
        None,
    ),
    (
        "Spool backlog (not yet uploaded)",
        "bytes",
        [
            ("backlog", "checkpointer_spool_backlog_bytes"),
            ("limit", "checkpointer_spool_limit_bytes"),
        ],
        "timeseries",
        12,
        None,
    ),
]


def panel(
    i: int,
    title: str,
    unit: str,
    targets: list[tuple[str, str]],
    kind: str,
    width: int,
    thresholds: list[tuple[str, float]] | None,
) -> dict[str, Any]:
    steps = [
        {"color": c, "value": None if n == 0 else v}
        for n, (c, v) in enumerate(thresholds or [("green", 0)])
    ]
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
        "targets": [
            {
                "refId": chr(65 + n),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for n, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "checkpointer",
        "title": "checkpointer",
        "description": "Checkpoints, restores and storage of the checkpointer daemons",
        "tags": ["checkpointer", "criu"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                },
                {
                    "name": "workload",
                    "type": "query",
                    "label": "Workload",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": "label_values(checkpointer_workload_up, workload)",
                        "refId": "workloads",
                    },
                    "definition": "label_values(checkpointer_workload_up, workload)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def main() -> None:
    out = Path(__file__).with_name("checkpointer-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
