"""The final checkpoint of a planned shutdown or reboot, so that a reboot loses no state.

`checkpointer shutdown-checkpoint` (the unit's ExecStop, only when systemd is taking the
system down) asks the daemon for it. Each running workload of this host is dumped with its
tree left stopped (CRIU's final dump, as `migrate` takes it: nothing the tree does after the
dump can be lost, because it does nothing more), stored, and the host's disks synced: in
a local repository the checkpoint is then on disk; with S3 its packs and manifest are in the
spool on disk and the upload finishes after the boot. The boot then restores it as the
workload's newest checkpoint (reason `boot`).

The record of what was taken (STATE_DIR/final-checkpoints.json, with the boot id) is what
the next start reads: a new boot logs which final checkpoint each workload comes back from;
the same boot means the system did not go down after all (a cancelled shutdown, or the
command run by hand), and the trees left stopped are thawed so that they run on.

A budget bounds it (`shutdown.budget`, below the unit's TimeoutStopSec): workloads are
taken oldest checkpoint first (the most state at stake), and one is skipped when what is
left of the budget is less than the longest final checkpoint so far; a skipped workload
keeps its last scheduled checkpoint, which the log and the report name. A dump already
started is not aborted (a half-done dump is worth nothing): the margin between the budget
and TimeoutStopSec covers that one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from checkpointer.api import FinalCheckpointReport, ShutdownReport
from checkpointer.engine.workload import Workload
from checkpointer.errors import CheckpointerError
from checkpointer.host import info as hostinfo
from checkpointer.workloads import process
from storage import StorageError

if TYPE_CHECKING:
    from checkpointer.engine.facade import Engine

log = logging.getLogger(__name__)

MARKS_FILE = "final-checkpoints.json"


def take_final_checkpoints(engine: Engine, budget: float) -> ShutdownReport:
    """Final checkpoints of every running workload within `budget` seconds. The caller
    has stopped the scheduler: no scheduled checkpoint may follow a final one."""
    t0 = time.monotonic()
    deadline = t0 + budget
    longest = 0.0
    outcomes: list[FinalCheckpointReport] = []
    running = [w for w in engine.workloads() if w.alive()]
    running.sort(key=lambda w: w.last_checkpoint_at or 0.0)  # most state at stake first
    for w in running:
        left = deadline - time.monotonic()
        if left <= 0 or left < longest:
            why = (
                f"the shutdown budget ({budget:g}s) had {max(left, 0):.1f}s left, the "
                f"longest final checkpoint took {longest:.1f}s: it keeps its last scheduled "
                f"checkpoint ({w.last_checkpoint or 'none'})"
            )
            log.warning("final checkpoint of %s skipped: %s", w.name, why)
            outcomes.append(_outcome(w.name, "kept", w.last_checkpoint, 0.0, why))
            continue
        outcome = _final(engine, w)
        longest = max(longest, outcome["duration_seconds"])
        outcomes.append(outcome)
    engine.save()
    os.sync()  # the repository or spool files, the registry: on disk before power goes
    finals = {o["workload"]: o["checkpoint"] for o in outcomes if o["result"] == "final"}
    _write_marks(engine.config.state_dir, finals)
    took = time.monotonic() - t0
    log.info(
        "shutdown: %d final checkpoint(s) of %d running workload(s) in %.2fs (budget %.0fs)",
        len(finals),
        len(running),
        took,
        budget,
    )
    return {"budget_seconds": budget, "duration_seconds": round(took, 3), "workloads": outcomes}


def _final(engine: Engine, w: Workload) -> FinalCheckpointReport:
    t0 = time.monotonic()
    try:
        with engine.locked(w, wait=True):  # a scheduled checkpoint in flight finishes first
            if not w.alive():
                return _outcome(w.name, "kept", w.last_checkpoint, 0.0, "it exited meanwhile")
            generation = engine.ownership.hold(w.name)  # fleet: still ours to checkpoint
            frozen = w.container is not None and engine.runtimes[str(w.kind)].freeze(w.container)
            try:
                report = engine.checkpoints.run(w, generation, final=True, for_reboot=True)
            except BaseException:
                _thaw(engine, w, frozen)  # it runs on until systemd stops it
                raise
    except (CheckpointerError, StorageError, OSError) as e:
        why = f"final checkpoint failed ({e}): it keeps its last checkpoint ({w.last_checkpoint})"
        log.error("shutdown: %s: %s", w.name, why)
        return _outcome(w.name, "kept", w.last_checkpoint, time.monotonic() - t0, why)
    log.info("shutdown: final checkpoint %s of %s, tree left stopped", report["id"], w.name)
    return _outcome(w.name, "final", report["id"], time.monotonic() - t0, "")


def _thaw(engine: Engine, w: Workload, frozen: bool) -> None:
    if frozen and w.container:
        engine.runtimes[str(w.kind)].thaw(w.container)
    if w.pid is not None:
        process.thaw(w.pid)


def _outcome(
    name: str, result: str, checkpoint: str | None, took: float, why: str
) -> FinalCheckpointReport:
    return {
        "workload": name,
        "result": result,
        "checkpoint": checkpoint,
        "duration_seconds": round(took, 3),
        "why": why,
    }


def _write_marks(state_dir: Path, finals: dict[str, str | None]) -> None:
    path = state_dir / MARKS_FILE
    tmp = path.with_suffix(".tmp")
    doc = {"boot_id": hostinfo.boot_id(), "at": time.time(), "checkpoints": finals}
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def settle_at_start(engine: Engine) -> None:
    """Read the record a shutdown left (then remove it). Called before the daemon re-adopts
    or restores anything: in the same boot the stopped trees are thawed (they are re-adopted
    as running); after a reboot the log says which final checkpoint each comes back from."""
    path = engine.config.state_dir / MARKS_FILE
    try:
        doc = json.loads(path.read_text())
        finals = {str(k): v for k, v in dict(doc["checkpoints"]).items()}
        same_boot = doc.get("boot_id") == hostinfo.boot_id()
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: %s", path, e)
        path.unlink(missing_ok=True)
        return
    for name, checkpoint in finals.items():
        w = engine.registry.find(name)
        if w is None:
            continue
        if same_boot:
            if w.alive():
                _thaw(engine, w, frozen=w.container is not None)
                log.warning(
                    "%s: left stopped by a final checkpoint (%s) but the system did not go "
                    "down: it runs on",
                    name,
                    checkpoint,
                )
        elif w.last_checkpoint == checkpoint:
            log.info(
                "%s comes back from its final checkpoint %s, taken at shutdown",
                name,
                w.last_checkpoint,
            )
        else:
            log.warning(
                "%s: its final checkpoint at shutdown was %s, but its newest is %s",
                name,
                checkpoint,
                w.last_checkpoint,
            )
    path.unlink(missing_ok=True)
