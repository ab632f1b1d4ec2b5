"""The command line. Every command takes --config; every reporting command takes --json.

Errors print one line (`error: ...`) and exit 1; usage errors exit 2. No tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from checkpointer import __version__
from checkpointer.cli import client as api
from checkpointer.config import Config, load_config
from checkpointer.config.durations import format_duration, parse_duration
from checkpointer.errors import CheckpointerError
from storage import StorageError

F = TypeVar("F", bound=Callable[..., Any])
out = Console() if sys.stdout.isatty() else Console(width=160)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def common(reporting: bool = True) -> Callable[[F], F]:
    """--config on every command, --json on reporting ones; turn known errors into one line."""

    def wrap(fn: F) -> F:
        @click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path),
            default=None,
            help="config file (default: $CHECKPOINTER_CONFIG, "
            "/etc/checkpointer/config.yaml, or built-in defaults)",
        )
        @functools.wraps(fn)
        def inner(config_path: Path | None, **kw: Any) -> Any:
            try:
                config = load_config(config_path)
                return fn(config, **kw)
            except CheckpointerError as e:
                _fail(str(e), 2 if e.kind == "config" else 1)
            except StorageError as e:
                _fail(str(e))
            except ValueError as e:
                _fail(str(e), 2)

        if reporting:
            inner = click.option(
                "--json", "as_json", is_flag=True, help="print JSON instead of a table"
            )(inner)
        return inner  # type: ignore[return-value]

    return wrap


def _duration(_ctx: Any, _param: Any, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _criu_flags(fn: F) -> F:
    for flag in ("tcp-established", "file-locks", "ext-unix-sk", "shell-job"):
        fn = click.option(
            f"--{flag}", is_flag=True, help=f"pass --{flag} to CRIU for this workload"
        )(fn)
    return fn


def _schedule_flags(fn: F) -> F:
    fn = click.option("--every", help="checkpoint interval, e.g. 30s, 5m")(fn)
    fn = click.option("--cron", help="checkpoint schedule, 5-field cron expression (UTC)")(fn)
    fn = click.option("--jitter", help="random delay added to each scheduled run, e.g. 5s")(fn)
    fn = click.option(
        "--keep-last",
        type=click.IntRange(min=1),
        default=None,
        help="checkpoints kept (default: the config's top-level retention)",
    )(fn)
    fn = click.option(
        "--max-restore-attempts",
        type=click.IntRange(min=1),
        default=None,
        help="automatic restores in a crash loop before the workload is failed",
    )(fn)
    fn = click.option(
        "--no-auto-restore", is_flag=True, help="do not restore by itself when the tree dies"
    )(fn)
    return fn


def _options(kw: dict[str, Any]) -> dict[str, Any]:
    """The workload options (config schema) from the flags; the daemon validates them."""
    criu = {k: kw.pop(k) for k in ("tcp_established", "file_locks", "ext_unix_sk", "shell_job")}
    restore: dict[str, Any] = {}
    if kw.pop("no_auto_restore"):
        restore["on_crash"] = False
    attempts = kw.pop("max_restore_attempts")
    if attempts:
        restore["max_attempts"] = attempts
    opts: dict[str, Any] = {"criu": criu, "restore": restore}
    keep_last = kw.pop("keep_last")
    if keep_last:
        opts["retention"] = {"keep_last": keep_last}
    for key in ("every", "cron", "jitter"):
        value = kw.pop(key)
        if value is not None:
            if key != "cron":
                _duration(None, None, value)  # a usage error here, not in the daemon
            opts[key] = value
    return opts


def _emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="checkpointer")
def cli() -> None:
    """Periodic CRIU checkpoints of process trees, restored when they die."""


@cli.command()
@common(reporting=False)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option(
    "--stop-workloads-on-exit",
    is_flag=True,
    help="stop managed workloads when the daemon stops (demos; not for production)",
)
def daemon(config: Config, log_format: str, stop_workloads_on_exit: bool) -> None:
    """Run scheduler, reaper, log pump and API until SIGTERM."""
    from checkpointer.daemon.main import run_daemon

    if os.geteuid() != 0:
        _fail("the daemon must run as root: CRIU needs CAP_SYS_ADMIN and friends")
    _setup_logging(log_format)
    run_daemon(config, stop_workloads_on_exit)


@cli.command(context_settings={"ignore_unknown_options": False})
@common()
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--cwd", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--env", multiple=True, help="KEY=VALUE for the workload's environment")
@_schedule_flags
@_criu_flags
def run(config: Config, as_json: bool, name: str, command: tuple[str, ...], **kw: Any) -> None:
    """Start COMMAND as managed workload NAME (own PID namespace): run NAME -- CMD ARGS..."""
    env = {}
    for item in kw.pop("env"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write KEY=VALUE", param_hint="--env")
        env[key] = value
    cwd = kw.pop("cwd")
    result = api.call(
        config.socket_path,
        "run",
        name=name,
        command=list(command),
        options=_options(kw),
        env=env,
        cwd=str(cwd.resolve() if cwd else Path.cwd()),
    )
    _emit(as_json, result, lambda: click.echo(f"started {name}: pid {result['pid']}"))


@cli.command()
@common()
@click.argument("name")
@click.option("--pid", type=int, default=None)
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path), default=None)
@_schedule_flags
@_criu_flags
def register(
    config: Config, as_json: bool, name: str, pid: int | None, pidfile: Path | None, **kw: Any
) -> None:
    """Adopt an existing process tree as workload NAME."""
    if (pid is None) == (pidfile is None):
        raise click.UsageError("give exactly one of --pid and --pidfile")
    result = api.call(
        config.socket_path,
        "register",
        name=name,
        pid=pid,
        pidfile=str(pidfile.resolve()) if pidfile else None,
        options=_options(kw),
    )
    _emit(as_json, result, lambda: click.echo(f"registered {name}: pid {result['pid']}"))


@cli.command()
@common()
@click.argument("name")
@click.option(
    "--keep-running",
    is_flag=True,
    help="leave a managed workload's processes running (default: stop them)",
)
def unregister(config: Config, as_json: bool, name: str, keep_running: bool) -> None:
    """Stop checkpointing NAME. Its checkpoints stay in the repository."""
    result = api.call(config.socket_path, "unregister", name=name, keep_running=keep_running)
    _emit(
        as_json,
        result,
        lambda: click.echo(
            f"unregistered {name}" + (" and stopped its processes" if result["stopped"] else "")
        ),
    )


@cli.command()
@common()
@click.argument("name", required=False)
def status(config: Config, as_json: bool, name: str | None) -> None:
    """Workloads: state, pid, last checkpoint and its age, next run."""
    rows = api.call(config.socket_path, "status", name=name)

    def human() -> None:
        if not rows:
            click.echo("no workloads registered")
            return
        t = Table(
            "NAME", "KIND", "STATE", "PID", "SCHEDULE", "LAST CHECKPOINT", "AGE", "NEXT", "PROBLEM"
        )
        for r in rows:
            age = r["last_checkpoint_age_seconds"]
            state = r["state"] + (f" ({r['exit_status']})" if r["exit_status"] else "")
            t.add_row(
                r["name"],
                r["kind"],
                state,
                str(r["pid"] or "-"),
                r["schedule"],
                r["last_checkpoint"] or "-",
                format_duration(age) if age else "-",
                _short_time(r["next_checkpoint"]),
                r["last_error"] or "",
            )
        out.print(t)

    _emit(as_json, rows, human)


@cli.command()
@common()
@click.argument("name")
def checkpoint(config: Config, as_json: bool, name: str) -> None:
    """Checkpoint NAME now; prints the new checkpoint id."""
    r = api.call(config.socket_path, "checkpoint", name=name)
    _emit(
        as_json,
        r,
        lambda: click.echo(
            f"{r['id']}  {_mb(r['size_bytes'])} image, {_mb(r['new_bytes'])} newly stored, "
            f"frozen {r['dump_stats']['frozen_time'] * 1000:.0f} ms, "
            f"total {r['duration_seconds']:.2f} s"
        ),
    )


@cli.command(name="list")
@common()
@click.argument("name")
def list_(config: Config, as_json: bool, name: str) -> None:
    """Checkpoints of NAME, newest first."""
    rows = api.call(config.socket_path, "list", name=name)

    def human() -> None:
        if not rows:
            click.echo(f"{name} has no checkpoints")
            return
        t = Table("ID", "CREATED (UTC)", "IMAGE", "NEW", "FROZEN")
        for r in rows:
            frozen = r["frozen_seconds"]
            t.add_row(
                r["id"],
                r["created"][:19].replace("T", " "),
                _mb(r["size_bytes"]),
                _mb(r["new_bytes"]),
                f"{frozen * 1000:.0f} ms" if frozen else "-",
            )
        out.print(t)

    _emit(as_json, rows, human)


@cli.command()
@common()
@click.argument("name")
@click.option(
    "--checkpoint", "checkpoint_id", default=None, help="checkpoint id (default: the latest)"
)
def restore(config: Config, as_json: bool, name: str, checkpoint_id: str | None) -> None:
    """Restore NAME, which must not be running, from a checkpoint."""
    with _progress(as_json, f"restoring {name}") as on_progress:
        r = api.call(
            config.socket_path,
            "restore",
            on_progress=on_progress,
            name=name,
            checkpoint_id=checkpoint_id,
        )
    _emit(
        as_json,
        r,
        lambda: click.echo(
            f"restored {name} from {r['checkpoint']}: pid {r['pid']} "
            f"in {r['duration_seconds']:.2f} s"
        ),
    )


@cli.command()
@common()
@click.argument("name")
@click.option("--to", "to", default=None, help="checkpoint id to roll back to")
@click.option(
    "--back",
    type=click.IntRange(min=0),
    default=None,
    help="go back N checkpoints from the newest (0 = the newest)",
)
def rollback(config: Config, as_json: bool, name: str, to: str | None, back: int | None) -> None:
    """Stop the running NAME and restore an older checkpoint. Its current state is lost."""
    if (to is None) == (back is None):
        raise click.UsageError("give exactly one of --to ID and --back N")
    r = api.call(config.socket_path, "rollback", name=name, to=to, back=back)
    _emit(
        as_json, r, lambda: click.echo(f"rolled {name} back to {r['checkpoint']}: pid {r['pid']}")
    )


@cli.command()
@common()
@click.argument("name", required=False)
@click.option("--dry-run", is_flag=True, help="show what would be removed, remove nothing")
def prune(config: Config, as_json: bool, name: str | None, dry_run: bool) -> None:
    """Apply retention now (NAME or every workload), then collect unreferenced packs."""
    r = api.call(config.socket_path, "prune", name=name, dry_run=dry_run)

    def human() -> None:
        t = Table("WORKLOAD", "ID", "CREATED (UTC)", "ACTION", "WHY")
        for c in r["checkpoints"]:
            action = c["action"] if not dry_run or c["action"] == "keep" else "would remove"
            t.add_row(
                c["workload"],
                c["id"],
                c["created"][:19].replace("T", " "),
                action,
                ", ".join(c["reasons"]),
            )
        out.print(t)
        gc = r["gc"]
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"garbage collection: {verb} {gc['deleted_packs']} unreferenced pack(s); "
            f"{gc['kept_young_unreferenced']} kept as younger than the grace period"
        )

    _emit(as_json, r, human)


@cli.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id", required=False)
def verify(config: Config, as_json: bool, name: str, checkpoint_id: str | None) -> None:
    """Re-hash every chunk of a checkpoint (default: the newest) in the repository."""
    with _progress(as_json, f"verifying {name}") as on_progress:
        r = api.call(
            config.socket_path,
            "verify",
            on_progress=on_progress,
            name=name,
            checkpoint_id=checkpoint_id,
        )
    _emit(
        as_json,
        r,
        lambda: click.echo(
            f"{r['id']} of {name}: ok, {r['chunks']} chunks ({_mb(r['size_bytes'])}) verified "
            f"in {r['duration_seconds']:.2f} s"
        ),
    )


@cli.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id")
@click.option("--remove", is_flag=True, help="unpin instead")
def pin(config: Config, as_json: bool, name: str, checkpoint_id: str, remove: bool) -> None:
    """Keep a checkpoint whatever retention says (or --remove the pin)."""
    r = api.call(config.socket_path, "pin", name=name, checkpoint_id=checkpoint_id, unpin=remove)
    _emit(
        as_json,
        r,
        lambda: click.echo(f"{'pinned' if r['pinned'] else 'unpinned'} {checkpoint_id} of {name}"),
    )


@cli.command()
@common()
def doctor(config: Config, as_json: bool) -> None:
    """Check CRIU, kernel features, storage and permissions; say how to fix what is missing."""
    from checkpointer.doctor import run_checks

    checks = run_checks(config)

    def human() -> None:
        t = Table("CHECK", "RESULT", "DETAIL", "FIX")
        for c in checks:
            mark = "ok" if c.ok else ("FAIL" if c.required else "missing")
            t.add_row(c.name, mark, c.detail, c.fix)
        out.print(t)

    _emit(as_json, [c.as_dict() for c in checks], human)
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


@contextlib.contextmanager
def _progress(as_json: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal (not with --json, not in a pipe)."""
    if as_json or not sys.stderr.isatty():
        yield None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _short_time(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).strftime("%H:%M:%S")


def _setup_logging(fmt: str) -> None:
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, r: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "time": self.formatTime(r),
                        "level": r.levelname,
                        "logger": r.name,
                        "message": r.getMessage(),
                    }
                )

        handler = logging.StreamHandler()
        handler.setFormatter(_Json())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        if os.environ.get("CHECKPOINTER_DEBUG"):
            raise
        _fail(
            f"internal error ({type(e).__name__}: {e}); rerun with CHECKPOINTER_DEBUG=1 for "
            "the traceback and report it"
        )


if __name__ == "__main__":
    main()
