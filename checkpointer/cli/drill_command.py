"""`checkpointer drill NAME [ID]`: restore a checkpoint in a sandbox now (engine/drills.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from checkpointer.api import DrillReport, Op
from checkpointer.cli import rendering as show
from checkpointer.cli.client import call
from checkpointer.cli.options import common


@click.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id", required=False)
def drill(socket_path: Path, as_json: bool, name: str, checkpoint_id: str | None) -> None:
    """Prove a checkpoint (default: the newest) restores: CRIU restores it in a sandbox.

    The sandbox cannot touch the running tree (its own PID, mount and network namespaces, the
    file systems copy-on-write, the restored tree never runs). A checkpoint that passes is
    marked verified and retention keeps the newest such; one that fails is marked bad (the
    restore policy skips it) and the reason is said. Exit status 0 only when verified."""
    r: DrillReport = call(socket_path, Op.DRILL, name=name, checkpoint_id=checkpoint_id)
    show.emit(as_json, r, lambda: _drilled(r))
    if r["result"] != "verified":
        sys.exit(1)


def _drilled(r: DrillReport) -> None:
    what = f"checkpoint {r['checkpoint']} of {r['workload']}"
    seconds = f"{r['duration_seconds']:.2f} s"
    if r["result"] == "verified":
        click.echo(f"{what} verified in {seconds}: {r['detail']}")
    elif r["marked_bad"]:
        click.echo(f"{what} failed its restore drill and is marked bad: {r['detail']}", err=True)
    else:
        click.echo(f"the restore drill of {what} could not tell: {r['detail']}", err=True)
