"""What a way of checkpointing offers the benchmark's loop."""

from __future__ import annotations

from bench.harness import Recorder
from bench.workloads import Workload


def phase(round_: int) -> str:
    """The first checkpoint of a workload is a full one; those after it are `steady`."""
    return "first" if round_ == 0 else "steady"


class Method:
    """One way of checkpointing a live workload. Its figures go to `rec` under `label` (the
    table's row), or under labels of its own for the variants it measures."""

    label = ""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def record(self, key: str, value: float) -> None:
        self.rec(self.label, key, value)

    def checkpoint(self, w: Workload, round_: int) -> None:
        """Checkpoint the live workload once (round 0 first), recording what it took."""
        raise NotImplementedError

    def rounds_done(self) -> None:
        """After the last round: drop what only the rounds needed."""

    def stored_bytes(self) -> int | None:
        """What its store holds after every round; None if not measured."""
        return None

    def restore(self, pid: int) -> int:
        """Kill the live tree `pid` and bring it back from this method's checkpoints (each
        restore measured is one more kill); the pid of the tree now running."""
        return pid
