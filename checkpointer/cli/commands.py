"""The command line. Every command takes --config; every reporting command takes --json.

Both may also come before the command name (`checkpointer --config FILE status`); given on
both sides, the one after the command wins. Errors print one line (`error: ...`) and exit 1;
usage errors exit 2. No tracebacks. What the commands share is in options.py; the `key`,
`drain` and `shutdown-checkpoint` commands in their own modules, added to the group here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from checkpointer import __version__
from checkpointer.cli import rendering as show
from checkpointer.cli.client import Client
from checkpointer.cli.drill_command import drill
from checkpointer.cli.fleet_commands import drain, shutdown_checkpoint
from checkpointer.cli.key_commands import key
from checkpointer.cli.options import (
    GlobalOptions,
    config_option,
    criu_flags,
    fail,
    schedule_flags,
    usage_error,
    workload_options,
)
from checkpointer.cli.options import common as common  # drill_command.py imports it here

if TYPE_CHECKING:
    from checkpointer.config import Config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="checkpointer")
@config_option()
@click.option(
    "--json", "as_json", is_flag=True, help="print JSON instead of a table (reporting commands)"
)
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Periodic CRIU checkpoints of process trees, restored when they die.

    --config and --json work before the command name or after it; after wins."""
    ctx.obj = GlobalOptions(config_path, as_json)


@cli.command()
@common(reporting=False, reads_config=True)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="the daemon's own log on stderr: lines of text, or one JSON object a line",
)
@click.option(
    "--stop-workloads-on-exit",
    is_flag=True,
    help="stop managed workloads when the daemon stops (demos; not for production)",
)
def daemon(config: Config, log_format: str, stop_workloads_on_exit: bool) -> None:
    """Run scheduler, reaper, log pump and API until SIGTERM."""
    from checkpointer.cli.daemon_logging import setup_logging
    from checkpointer.daemon.main import run_daemon

    if os.geteuid() != 0:
        fail("the daemon must run as root: CRIU needs CAP_SYS_ADMIN and friends")
    setup_logging(log_format)
    run_daemon(config, stop_workloads_on_exit)


@cli.command(context_settings={"ignore_unknown_options": False})
@common()
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option(
    "--cwd",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="the workload's working directory (default: this one)",
)
@click.option("--env", multiple=True, help="KEY=VALUE for the workload's environment")
@schedule_flags
@criu_flags
def run(socket_path: Path, as_json: bool, name: str, command: tuple[str, ...], **kw: Any) -> None:
    """Start COMMAND as managed workload NAME (own PID namespace): run NAME -- CMD ARGS..."""
    env = {}
    for item in kw.pop("env"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write KEY=VALUE", param_hint="--env")
        env[key] = value
    cwd = kw.pop("cwd")
    result = Client(socket_path).run(
        name,
        list(command),
        options=workload_options(kw),
        env=env,
        cwd=str(cwd.resolve() if cwd else Path.cwd()),
    )
    show.emit(as_json, result, lambda: show.started(name, result))


@cli.command()
@common()
@click.argument("name")
@click.option("--pid", type=int, default=None, help="the root process of the tree to adopt")
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="a file holding the PID of the tree to adopt (its first word), read when registering",
)
@click.option("--lxc", "lxc", metavar="CONTAINER", default=None, help="an LXC container")
@click.option(
    "--podman", "podman", metavar="CONTAINER", default=None, help="a Podman container (runc)"
)
@schedule_flags
@criu_flags
def register(
    socket_path: Path,
    as_json: bool,
    name: str,
    pid: int | None,
    pidfile: Path | None,
    lxc: str | None,
    podman: str | None,
    **kw: Any,
) -> None:
    """Adopt an existing process tree, or a container, as workload NAME."""
    if sum(x is not None for x in (pid, pidfile, lxc, podman)) != 1:
        raise click.UsageError("give exactly one of --pid, --pidfile, --lxc and --podman")
    result = Client(socket_path).register(
        name,
        pid=pid,
        pidfile=str(pidfile.resolve()) if pidfile else None,
        options=workload_options(kw),
        lxc=lxc,
        podman=podman,
    )
    show.emit(as_json, result, lambda: show.registered(name, result))


@cli.command()
@common()
@click.argument("name")
@click.option(
    "--keep-running",
    is_flag=True,
    help="leave a managed workload's processes running (default: stop them)",
)
def unregister(socket_path: Path, as_json: bool, name: str, keep_running: bool) -> None:
    """Stop checkpointing NAME. Its checkpoints stay in the repository."""
    result = Client(socket_path).unregister(name, keep_running=keep_running)
    show.emit(as_json, result, lambda: show.unregistered(name, result))


@cli.command()
@common()
@click.argument("name", required=False)
def status(socket_path: Path, as_json: bool, name: str | None) -> None:
    """Workloads: state, pid, last checkpoint and its age, next run."""
    rows = Client(socket_path).status(name)
    show.emit(as_json, rows, lambda: show.status_table(rows))


@cli.command()
@common()
@click.argument("name")
def checkpoint(socket_path: Path, as_json: bool, name: str) -> None:
    """Checkpoint NAME now; prints the new checkpoint id."""
    r = Client(socket_path).checkpoint(name)
    show.emit(as_json, r, lambda: show.checkpointed(r))


@cli.command(name="list")
@common()
@click.argument("name")
def list_(socket_path: Path, as_json: bool, name: str) -> None:
    """Checkpoints of NAME, newest first."""
    rows = Client(socket_path).checkpoints(name)
    show.emit(as_json, rows, lambda: show.checkpoints_table(name, rows))


@cli.command()
@common()
@click.argument("name")
@click.option(
    "--checkpoint", "checkpoint_id", default=None, help="checkpoint id (default: the latest)"
)
@click.option(
    "--lazy/--full",
    "lazy",
    default=None,
    help="pages on demand from the repository, or every page first, a disk image's after "
    "a reboot included (default: restore.lazy and restore.lazy_after_reboot)",
)
def restore(
    socket_path: Path, as_json: bool, name: str, checkpoint_id: str | None, lazy: bool | None
) -> None:
    """Restore NAME, which must not be running, from a checkpoint."""
    with show.progress(as_json, f"restoring {name}") as on_progress:
        r = Client(socket_path).restore(name, checkpoint_id, on_progress=on_progress, lazy=lazy)
    show.emit(as_json, r, lambda: show.restored(name, r))


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
def rollback(socket_path: Path, as_json: bool, name: str, to: str | None, back: int | None) -> None:
    """Stop the running NAME and restore an older checkpoint. Its current state is lost."""
    if (to is None) == (back is None):
        raise click.UsageError("give exactly one of --to ID and --back N")
    r = Client(socket_path).rollback(name, to=to, back=back)
    show.emit(as_json, r, lambda: show.rolled_back(name, r))


@cli.command()
@common()
@click.argument("name")
@click.option("--to", "to", required=True, help="the host id of the fleet to move it to")
def migrate(socket_path: Path, as_json: bool, name: str, to: str) -> None:
    """Move NAME to another host of the fleet: final checkpoint, hand-over, stopped here."""
    r = Client(socket_path).migrate(name, to)
    show.emit(as_json, r, lambda: show.migrated(r))


@cli.command()
@common()
def hosts(socket_path: Path, as_json: bool) -> None:
    """The fleet's live hosts, the workloads each owns, and those its CPU cannot take."""
    rows = Client(socket_path).hosts()
    show.emit(as_json, rows, lambda: show.hosts_table(rows))


@cli.command()
@common()
@click.argument("name", required=False)
@click.option("--dry-run", is_flag=True, help="show what would be removed, remove nothing")
def prune(socket_path: Path, as_json: bool, name: str | None, dry_run: bool) -> None:
    """Apply retention now (NAME or every workload), then collect unreferenced packs."""
    r = Client(socket_path).prune(name, dry_run=dry_run)
    show.emit(as_json, r, lambda: show.prune_report(r, dry_run))


@cli.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id", required=False)
def verify(socket_path: Path, as_json: bool, name: str, checkpoint_id: str | None) -> None:
    """Re-hash every chunk of a checkpoint (default: the newest) in the repository."""
    with show.progress(as_json, f"verifying {name}") as on_progress:
        r = Client(socket_path).verify(name, checkpoint_id, on_progress=on_progress)
    show.emit(as_json, r, lambda: show.verified(name, r))


@cli.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id")
@click.option("--remove", is_flag=True, help="unpin instead")
def pin(socket_path: Path, as_json: bool, name: str, checkpoint_id: str, remove: bool) -> None:
    """Keep a checkpoint whatever retention says (or --remove the pin)."""
    r = Client(socket_path).pin(name, checkpoint_id, unpin=remove)
    show.emit(as_json, r, lambda: show.pinned(name, checkpoint_id, r))


@cli.command()
@common(reads_config=True)
def doctor(config: Config, as_json: bool) -> None:
    """Check CRIU, kernel features, storage and permissions; say how to fix what is missing."""
    from checkpointer.cli.doctor import run_checks

    checks = run_checks(config)
    show.emit(as_json, [c.as_dict() for c in checks], lambda: show.doctor_table(checks))
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


cli.add_command(key)
cli.add_command(drain)
cli.add_command(shutdown_checkpoint)
cli.add_command(drill)


def main() -> None:
    """The `checkpointer` command: every error in one line (click's usage errors too)."""
    try:
        cli.main(prog_name="checkpointer", standalone_mode=False)  # --help and --version: 0
    except click.exceptions.NoArgsIsHelpError as e:  # no command: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        usage_error(e)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as e:
        if os.environ.get("CHECKPOINTER_DEBUG"):
            raise
        fail(
            f"internal error ({type(e).__name__}: {e}); rerun with CHECKPOINTER_DEBUG=1 for "
            "the traceback and report it"
        )


if __name__ == "__main__":
    main()
