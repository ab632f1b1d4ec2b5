"""`checkpointer shutdown-checkpoint` and `checkpointer drain`: taking a host out of service
without losing state, for a reboot (final checkpoints on disk) or for maintenance (every
workload migrated to the fleet's other hosts)."""

from __future__ import annotations

from pathlib import Path

import click

from checkpointer.api import DrainReport, Op, ShutdownReport
from checkpointer.cli import rendering as show
from checkpointer.cli.client import call
from checkpointer.cli.options import common
from checkpointer.config.durations import parse_duration


def system_state() -> str:
    """systemd's `is-system-running` answer ("stopping" once a shutdown or reboot is under
    way: shutdown.target is queued or active); "unknown" without systemctl."""
    import shutil
    import subprocess

    exe = shutil.which("systemctl")
    if exe is None:
        return "unknown"
    r = subprocess.run([exe, "is-system-running"], capture_output=True, text=True, timeout=10)
    return r.stdout.strip() or "unknown"  # its exit status is non-zero unless "running"


@click.command("shutdown-checkpoint")
@common()
@click.option(
    "--when-system-stops",
    is_flag=True,
    help="do nothing unless systemd is shutting the system down (the unit's ExecStop)",
)
@click.option("--budget", default=None, help="at most this long (default: shutdown.budget)")
def shutdown_checkpoint(
    socket_path: Path, as_json: bool, when_system_stops: bool, budget: str | None
) -> None:
    """Final checkpoints of every workload, trees left stopped, before a reboot.

    The unit runs this as its ExecStop with --when-system-stops: systemd runs ExecStop both
    when the service alone is stopped or restarted (an upgrade: the workloads must keep
    running, re-adopted by the next daemon) and when the system goes down; only the second
    reports "stopping". ExecStop rather than a helper unit ordered against shutdown.target:
    it runs at exactly the moment systemd stops this unit, so the unit's own ordering
    (After=network-online.target: stopped before the network) holds for it, and the
    workloads, in this unit's cgroup with KillMode=process, are killed only after it."""
    if when_system_stops:
        state = system_state()
        if state != "stopping":
            click.echo(
                f"the system is {state}, not shutting down: no final checkpoint (the next "
                "daemon re-adopts the running workloads)"
            )
            return
    seconds = parse_duration(budget) if budget is not None else None
    r: ShutdownReport = call(socket_path, Op.SHUTDOWN_CHECKPOINT, budget=seconds)
    show.emit(as_json, r, lambda: show.shutdown_table(r))


@click.command()
@common()
@click.option("--to", "to", metavar="HOST", default=None, help="send every workload to HOST")
def drain(socket_path: Path, as_json: bool, to: str | None) -> None:
    """Migrate every workload of this host to the fleet's other live hosts (or HOST).

    Least-loaded host first; hosts that are draining themselves are never picked. A
    workload that cannot move keeps running here and is listed with why."""
    with show.progress(as_json, "draining", counting="workloads") as on_progress:
        r: DrainReport = call(socket_path, Op.DRAIN, on_progress=on_progress, to=to)
    show.emit(as_json, r, lambda: show.drain_table(r))
    if any(o["result"] != "moved" for o in r["workloads"]):
        raise SystemExit(1)  # not drained: maintenance would stop what still runs here
