"""The statistics a checkpoint, restore or drill report carries: typed (api.DumpStatsReport,
api.RestoreStatsReport), and on the wire the same JSON object as before they were typed (the
CLI and scripts read these keys)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from checkpointer import api
from checkpointer.criu import DumpStats, RestoreStats

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


@pytest.mark.parametrize(
    ("stats", "report"),
    [
        (DumpStats(0.001, 0.0421, 0.03, 0.02, 3000, 1200), api.DumpStatsReport),
        (RestoreStats(0.004, 0.25, 1200), api.RestoreStatsReport),
    ],
)
def test_stats_reach_the_wire_as_the_same_json_object(
    stats: DumpStats | RestoreStats, report: type
) -> None:
    typed = stats.as_dict()
    assert json.dumps(typed) == json.dumps(dataclasses.asdict(stats))
    assert set(typed) == set(report.__annotations__)
