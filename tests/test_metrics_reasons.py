"""The restore counters a new workload starts with: one series per reason a restore runs for
(the RestoreReason enum), so an alert on `increase(...)` works from the first restore."""

from __future__ import annotations

import pytest

from checkpointer.daemon.metrics import Metrics
from checkpointer.engine.states import RestoreReason

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def test_a_new_workload_has_a_zero_restore_series_for_every_reason() -> None:
    m = Metrics()
    m.workload_added("web")
    reasons = {
        s.labels["reason"]
        for metric in m.registry.collect()
        if metric.name == "checkpointer_restores"
        for s in metric.samples
        if s.name == "checkpointer_restores_total" and s.value == 0
    }
    assert reasons == {r.value for r in RestoreReason} - {"lazy"}
