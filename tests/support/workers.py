"""Which pytest-xdist worker this process is, so that parallel workers never hand out the same
loopback port or test subnet, and each keeps its temporary folders apart.

`make test` runs the suite in several worker processes (pytest-xdist sets PYTEST_XDIST_WORKER
to gw0, gw1, ... and PYTEST_XDIST_WORKER_COUNT in each); run any other way (one file by hand,
bench/), this process is worker 0 of 1 and gets everything.
"""

from __future__ import annotations

import os


def worker() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker; (0, 1) outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (name.startswith("gw") and name[2:].isdigit() and count.isdigit()):
        return 0, 1
    index, total = int(name[2:]), int(count)
    return (index, total) if 0 <= index < total else (0, 1)


def share(first: int, last: int) -> range:
    """This worker's slice of [first, last]: the workers' slices are disjoint and cover it."""
    index, total = worker()
    size = (last - first + 1) // total
    if size < 1:
        raise RuntimeError(f"{total} test workers cannot share {first}..{last}")
    return range(first + index * size, first + (index + 1) * size)
