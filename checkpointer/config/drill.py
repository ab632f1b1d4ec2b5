"""A workload's restore drills (checkpointer/engine/drills.py): how often its newest checkpoint
is restored in a sandbox to prove it restores. Off unless asked for: a drill costs a restore's
CPU and memory (measured in bench/drill.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from checkpointer.config.types import Interval


class DrillPolicy(BaseModel):
    """Restore drills of one workload: its newest checkpoint restored in a sandbox."""

    model_config = ConfigDict(extra="forbid")

    every: Interval | None = Field(
        None,
        description="restore the newest checkpoint in a sandbox this often (e.g. 1d; off: "
        "only `checkpointer drill NAME`); the first drill follows the first checkpoint",
    )
