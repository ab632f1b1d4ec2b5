"""Rendezvous ranking of a dead host's workloads over the watchers (fleet_rank.py): every host
computes the same order from the names alone, the first choices spread evenly, and a host
leaving the candidates moves only the workloads it was first for. The fleet-level behaviour
(one scan period per refusing or dead first choice, each lease read only by the hosts whose
turn it is) is in tests/test_fleet_liveness.py."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from checkpointer.daemon.fleet_rank import order, rank, weight, within

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

HOSTS = [f"h{i:03d}" for i in range(10)]
WORKLOADS = [f"w{i:05d}" for i in range(10_000)]


def test_the_ranking_is_the_same_on_every_host_and_in_any_order() -> None:
    shuffled = random.Random(7).sample(HOSTS, len(HOSTS))
    for w in WORKLOADS[:200]:
        first = order(w, HOSTS)
        assert order(w, shuffled) == first
        # each host, counting from its own view, finds its own place in that one order
        assert [rank(w, h, set(HOSTS) - {h}) for h in first] == list(range(len(HOSTS)))
    # pinned: not Python's salted hash(); hosts of two versions must agree on it
    assert weight("w00000", "h000") == 4920527999311189000
    assert order("web", ["a", "b", "c"]) == ["c", "b", "a"]


def test_the_first_choices_spread_evenly_over_the_hosts() -> None:
    firsts = Counter(order(w, HOSTS)[0] for w in WORKLOADS)
    assert set(firsts) == set(HOSTS)
    # 1,000 each on average; binomial sd ~30: a hash that clusters would be far off
    assert max(firsts.values()) < 1150 and min(firsts.values()) > 850, firsts


def test_a_host_leaving_moves_only_its_own_workloads_to_the_next_in_line() -> None:
    gone = "h003"
    rest = [h for h in HOSTS if h != gone]
    for w in WORKLOADS[:2000]:
        before, after = order(w, HOSTS), order(w, rest)
        assert after == [h for h in before if h != gone]  # the fallback is the next in line
        if before[0] != gone:
            assert after[0] == before[0]


def test_within_k_is_rank_at_most_k() -> None:
    for w in WORKLOADS[:300]:
        for h in HOSTS[:3]:
            others = set(HOSTS) - {h}
            for k in (0, 2, 5):
                assert within(w, h, others, k) == (rank(w, h, others) <= k)
