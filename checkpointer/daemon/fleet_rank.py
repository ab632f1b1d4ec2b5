"""Who takes over which of a dead host's workloads: rendezvous (highest-random-weight) hashing
of (workload, watcher) over the watchers each one sees alive and eligible.

Without it every watcher raced for every lease of the dead host: at 100 hosts x 10,000
workloads, 99 watchers x 100 leases of serial GETs, the `leases/` prefix throttled, and the
last workload taken 470 s after the death at 100 ms a request (bench/results/fleet_scale.json
before this). With it each watcher computes, from nothing but the names, the same order of
candidates for a workload; the first acts at once, the k-th only k scan periods later and
only if the lease is still the dead host's then. So a dead, slow or refusing first choice
(failover off, draining, a CPU the checkpoint does not fit) costs a workload one scan period,
not its failover, and each watcher reads only the leases that are its own to take.

The ranking removes the herd, not a hazard: two watchers whose views of the fleet differ may
both rank themselves first, and the takeover's conditional write (If-Match on the lease
version read, after reading the heartbeat again) still lets one of them win.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(workload: str, host: str) -> int:
    """A stable pseudo-random weight of the pair: the same on every host and in every
    version of Python (no `hash()`, which is salted per process)."""
    digest = hashlib.blake2b(f"{workload}\0{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(workload: str, host: str, candidates: Iterable[str]) -> int:
    """`host`'s place (0: first) among `candidates` (`host` counted in whether listed or
    not) for taking over `workload`: how many candidates weigh more."""
    mine = weight(workload, host)
    return sum(1 for other in set(candidates) - {host} if weight(workload, other) > mine)


def within(workload: str, host: str, candidates: Iterable[str], k: int) -> bool:
    """Whether `host`'s rank for `workload` is at most `k`: `rank(...) <= k`, stopping at
    the (k+1)-th heavier candidate (about 3 ln H weights instead of H, for k = 2: what the
    sweep asks of every lease it has never read)."""
    mine = weight(workload, host)
    heavier = 0
    for other in candidates:
        if other != host and weight(workload, other) > mine:
            heavier += 1
            if heavier > k:
                return False
    return True


def order(workload: str, candidates: Iterable[str]) -> list[str]:
    """The candidates in the order they take `workload` over (for `checkpointer status`-style
    views and tests)."""
    return sorted(set(candidates), key=lambda h: weight(workload, h), reverse=True)
