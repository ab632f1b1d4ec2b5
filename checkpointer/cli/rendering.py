"""How the CLI shows results: tables, one-line summaries, sizes, times and progress bars.

`--json` bypasses all of this (see `emit`): the reports are printed as the daemon sent them.
rich is imported by the first table or progress bar: a command that prints one line starts
without it (~0.1 s, `python -X importtime`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from checkpointer.api import (
    CheckpointEntry,
    CheckpointReport,
    DrainReport,
    HostReport,
    MigrateReport,
    PinReport,
    PruneReport,
    RestoreReport,
    ShutdownReport,
    StatusReport,
    UnregisterReport,
    VerifyReport,
)
from checkpointer.cli.client import ProgressCallback
from checkpointer.config.durations import format_duration

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from checkpointer.cli.doctor import Check


@functools.cache
def console() -> Console:
    """Where tables go: the terminal, or 160 columns in a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def new_table(*columns: str) -> Table:
    from rich.table import Table

    return Table(*columns)


def print_table(t: Table) -> None:
    console().print(t)


def emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """Print `data` as JSON with --json, else call `human` to render it."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human()


@contextlib.contextmanager
def progress(
    as_json: bool, label: str, counting: str | None = None
) -> Iterator[ProgressCallback | None]:
    """A progress bar on a terminal (not with --json, not in a pipe): bytes, or things
    counted (`counting`, e.g. "workloads")."""
    if as_json or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        (MofNCompleteColumn(), TextColumn(counting))
        if counting
        else (DownloadColumn(), TransferSpeedColumn())
    )
    with Progress(
        TextColumn(label),
        BarColumn(),
        *columns,
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def short_time(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).strftime("%H:%M:%S")


def created(iso: str) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS`."""
    return iso[:19].replace("T", " ")


def started(name: str, r: StatusReport) -> None:
    click.echo(f"started {name}: pid {r['pid']}")


def registered(name: str, r: StatusReport) -> None:
    what = f"{r['kind']} container {r['container']}, " if r.get("container") else ""
    click.echo(f"registered {name}: {what}pid {r['pid']}")


def unregistered(name: str, r: UnregisterReport) -> None:
    click.echo(f"unregistered {name}" + (" and stopped its processes" if r["stopped"] else ""))


def status_table(rows: Sequence[StatusReport]) -> None:
    if not rows:
        click.echo("no workloads registered")
        return
    t = new_table(
        "NAME",
        "KIND",
        "STATE",
        "PID",
        "SCHEDULE",
        "LAST CHECKPOINT",
        "AGE",
        "NEXT",
        "VERIFIED",
        "PROBLEM",
    )
    for r in rows:
        age = r["last_checkpoint_age_seconds"]
        state = r["state"] + (f" ({r['exit_status']})" if r["exit_status"] else "")
        problem = r["last_error"] or ""
        if r.get("restore_retries"):  # absent from an older daemon's answer
            problem = f"{problem} (restore retried {r['restore_retries']} times)".lstrip()
        t.add_row(
            r["name"],
            r["kind"],
            state,
            str(r["pid"] or "-"),
            r["schedule"],
            r["last_checkpoint"] or "-",
            format_duration(age) if age else "-",
            short_time(r["next_checkpoint"]),
            _verified(r),
            problem,
        )
    print_table(t)


def _verified(r: StatusReport) -> str:
    """The age of the newest checkpoint a restore drill verified, and a failed last drill."""
    drill = r.get("drill")  # absent from an older daemon's answer
    if not drill:
        return "-"
    age = drill["verified_age_seconds"]
    text = format_duration(age) if age is not None else "-"
    if drill["last_result"] in ("failed", "error"):
        text += f" (last drill {drill['last_result']})"
    return text


def checkpointed(r: CheckpointReport) -> None:
    click.echo(
        f"{r['id']}  {mb(r['size_bytes'])} image, {mb(r['new_bytes'])} newly stored, "
        f"frozen {r['dump_stats']['frozen_time'] * 1000:.0f} ms, "
        f"total {r['duration_seconds']:.2f} s"
    )


def checkpoints_table(name: str, rows: Sequence[CheckpointEntry]) -> None:
    if not rows:
        click.echo(f"{name} has no checkpoints")
        return
    t = new_table("ID", "CREATED (UTC)", "IMAGE", "NEW", "FROZEN", "MARK")
    for r in rows:
        frozen = r["frozen_seconds"]
        mark = r.get("mark")  # absent from an older daemon's answer
        t.add_row(
            r["id"],
            created(r["created"]),
            mb(r["size_bytes"]),
            mb(r["new_bytes"]),
            f"{frozen * 1000:.0f} ms" if frozen else "-",
            f"{mark}: {r.get('mark_reason')}" if mark else "verified" if r.get("verified") else "",
        )
    print_table(t)
    if rows[0].get("local_only"):
        click.echo(f"warning: {rows[0]['local_only']}", err=True)


def restored(name: str, r: RestoreReport) -> None:
    click.echo(
        f"restored {name} from {r['checkpoint']}: pid {r['pid']} in {r['duration_seconds']:.2f} s"
    )
    if r.get("warning"):
        click.echo(f"warning: {r['warning']}", err=True)


def rolled_back(name: str, r: RestoreReport) -> None:
    click.echo(f"rolled {name} back to {r['checkpoint']}: pid {r['pid']}")


def prune_report(r: PruneReport, dry_run: bool) -> None:
    t = new_table("WORKLOAD", "ID", "CREATED (UTC)", "ACTION", "WHY")
    for c in r["checkpoints"]:
        action = c["action"] if not dry_run or c["action"] == "keep" else "would remove"
        t.add_row(c["workload"], c["id"], created(c["created"]), action, ", ".join(c["reasons"]))
    print_table(t)
    gc = r["gc"]
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"garbage collection: {verb} {gc['deleted_packs']} unreferenced pack(s); "
        f"{gc['kept_young_unreferenced']} kept as younger than the grace period"
    )


def verified(name: str, r: VerifyReport) -> None:
    click.echo(
        f"{r['id']} of {name}: ok, {r['chunks']} chunks ({mb(r['size_bytes'])}) verified "
        f"in {r['duration_seconds']:.2f} s"
    )


def pinned(name: str, checkpoint_id: str, r: PinReport) -> None:
    click.echo(f"{'pinned' if r['pinned'] else 'unpinned'} {checkpoint_id} of {name}")


def doctor_table(checks: Sequence[Check]) -> None:
    t = new_table("CHECK", "RESULT", "DETAIL", "FIX")
    for c in checks:
        mark = "ok" if c.ok else ("FAIL" if c.required else "missing")
        t.add_row(c.name, mark, c.detail, c.fix)
    print_table(t)


def migrated(r: MigrateReport) -> None:
    click.echo(
        f"{r['workload']} migrated to {r['to']} (final checkpoint {r['checkpoint']}, "
        f"{r['duration_seconds']:.2f}s); it runs there now"
    )


def hosts_table(rows: Sequence[HostReport]) -> None:
    """One row per live host; CANNOT TAKE: one line per workload whose newest checkpoint
    its CPU cannot run, with the features it lacks (checkpointer/engine/host_cpus.py)."""
    t = new_table("HOST", "LAST SEEN", "WORKLOADS", "CANNOT TAKE (CPU)")
    for r in rows:
        name = r["host"] + (" (this host)" if r["this_host"] else "")
        name += " (draining)" if r.get("draining") else ""
        seen = datetime.fromtimestamp(r["last_seen"]).astimezone().strftime("%H:%M:%S")
        t.add_row(name, seen, ", ".join(r["workloads"]) or "-", _cannot_take(r))
    print_table(t)


def _cannot_take(r: HostReport) -> str:
    if "cpu_known" in r and not r["cpu_known"]:
        return "? (its CPU is not published: an older version, or no CRIU there)"
    lines = [
        f"{u['workload']}: lacks {', '.join(u['missing'][:6])}"
        + (f" and {len(u['missing']) - 6} more" if len(u["missing"]) > 6 else "")
        for u in r.get("cannot_take", [])
    ]
    return "\n".join(lines) or "-"


def shutdown_table(r: ShutdownReport) -> None:
    t = new_table("WORKLOAD", "RESULT", "CHECKPOINT", "SECONDS", "WHY")
    for o in r["workloads"]:
        t.add_row(
            o["workload"],
            o["result"],
            o["checkpoint"] or "-",
            f"{o['duration_seconds']:.2f}",
            o["why"],
        )
    print_table(t)
    finals = sum(o["result"] == "final" for o in r["workloads"])
    click.echo(
        f"{finals} of {len(r['workloads'])} workload(s) checkpointed for the shutdown in "
        f"{r['duration_seconds']:.2f}s (budget {r['budget_seconds']:.0f}s); their trees are "
        "left stopped"
    )


def drain_table(r: DrainReport) -> None:
    t = new_table("WORKLOAD", "RESULT", "TO", "SECONDS", "WHY IT STAYED")
    for o in r["workloads"]:
        t.add_row(
            o["workload"], o["result"], o["to"] or "-", f"{o['duration_seconds']:.2f}", o["why"]
        )
    print_table(t)
    moved = sum(o["result"] == "moved" for o in r["workloads"])
    stayed = len(r["workloads"]) - moved
    click.echo(
        f"{r['host']} drained in {r['duration_seconds']:.2f}s: {moved} moved"
        + (f", {stayed} still here (listed with why)" if stayed else "")
    )
