"""The command line. Every command takes --config; every reporting command takes --json.

Both may also come before the command name (`checkpointer --config FILE status`); given on
both sides, the one after the command wins. Errors print one line (`error: ...`) and exit 1;
usage errors exit 2. No tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from checkpointer import __version__
from checkpointer.cli import rendering as show
from checkpointer.cli.client import Client
from checkpointer.config import Config, load_config
from checkpointer.config.durations import parse_duration
from checkpointer.errors import CheckpointerError
from storage import StorageError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@dataclass(frozen=True)
class GlobalOptions:
    """--config and --json given before the command name (the group's options)."""

    config_path: Path | None = None
    as_json: bool = False


def _before_command() -> GlobalOptions:
    obj = click.get_current_context().find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def _config_option() -> Callable[[F], F]:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help="config file (default: $CHECKPOINTER_CONFIG, "
        "/etc/checkpointer/config.yaml, or built-in defaults)",
    )


def common(reporting: bool = True) -> Callable[[F], F]:
    """--config on every command, --json on reporting ones; turn known errors into one line.

    Either option left out after the command name takes its value from before it."""

    def wrap(fn: F) -> F:
        @_config_option()
        @functools.wraps(fn)
        def inner(config_path: Path | None, **kw: Any) -> Any:
            before = _before_command()
            if config_path is None:
                config_path = before.config_path
            if reporting:
                kw["as_json"] = kw["as_json"] or before.as_json
            elif before.as_json:
                ctx = click.get_current_context()
                raise click.UsageError(f"--json does not apply to {ctx.info_name}", ctx=ctx)
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
    fn = click.option(
        "--criu-opt",
        "criu_opts",
        multiple=True,
        metavar="OPT",
        help="another CRIU option from the allow-list, e.g. --criu-opt --manage-cgroups=full "
        "or --criu-opt '--ghost-limit 64M' (repeatable)",
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
    fn = click.option(
        "--lazy-restore",
        is_flag=True,
        help="restores from the repository start the tree first, its memory on demand",
    )(fn)
    return fn


def _options(kw: dict[str, Any]) -> dict[str, Any]:
    """The workload options (config schema) from the flags, checked here (a usage error
    before the daemon is asked) with the model the daemon validates them with again."""
    from pydantic import ValidationError

    from checkpointer.config import WorkloadOptions, format_validation_error
    from checkpointer.errors import ConfigError

    criu: dict[str, Any] = {
        k: kw.pop(k) for k in ("tcp_established", "file_locks", "ext_unix_sk", "shell_job")
    }
    extra = list(kw.pop("criu_opts", ()) or ())
    if extra:
        criu["extra_options"] = extra
    restore: dict[str, Any] = {}
    if kw.pop("no_auto_restore"):
        restore["on_crash"] = False
    if kw.pop("lazy_restore"):
        restore["lazy"] = True
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
            opts[key] = value
    try:
        WorkloadOptions.model_validate(opts)
    except ValidationError as e:
        raise ConfigError(f"invalid workload options: {format_validation_error(e, opts)}") from e
    return opts


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="checkpointer")
@_config_option()
@click.option(
    "--json", "as_json", is_flag=True, help="print JSON instead of a table (reporting commands)"
)
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Periodic CRIU checkpoints of process trees, restored when they die.

    --config and --json work before the command name or after it; after wins."""
    ctx.obj = GlobalOptions(config_path, as_json)


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
    result = Client(config.socket_path).run(
        name,
        list(command),
        options=_options(kw),
        env=env,
        cwd=str(cwd.resolve() if cwd else Path.cwd()),
    )
    show.emit(as_json, result, lambda: show.started(name, result))


@cli.command()
@common()
@click.argument("name")
@click.option("--pid", type=int, default=None)
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--lxc", "lxc", metavar="CONTAINER", default=None, help="an LXC container")
@click.option(
    "--podman", "podman", metavar="CONTAINER", default=None, help="a Podman container (runc)"
)
@_schedule_flags
@_criu_flags
def register(
    config: Config,
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
    result = Client(config.socket_path).register(
        name,
        pid=pid,
        pidfile=str(pidfile.resolve()) if pidfile else None,
        options=_options(kw),
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
def unregister(config: Config, as_json: bool, name: str, keep_running: bool) -> None:
    """Stop checkpointing NAME. Its checkpoints stay in the repository."""
    result = Client(config.socket_path).unregister(name, keep_running=keep_running)
    show.emit(as_json, result, lambda: show.unregistered(name, result))


@cli.command()
@common()
@click.argument("name", required=False)
def status(config: Config, as_json: bool, name: str | None) -> None:
    """Workloads: state, pid, last checkpoint and its age, next run."""
    rows = Client(config.socket_path).status(name)
    show.emit(as_json, rows, lambda: show.status_table(rows))


@cli.command()
@common()
@click.argument("name")
def checkpoint(config: Config, as_json: bool, name: str) -> None:
    """Checkpoint NAME now; prints the new checkpoint id."""
    r = Client(config.socket_path).checkpoint(name)
    show.emit(as_json, r, lambda: show.checkpointed(r))


@cli.command(name="list")
@common()
@click.argument("name")
def list_(config: Config, as_json: bool, name: str) -> None:
    """Checkpoints of NAME, newest first."""
    rows = Client(config.socket_path).checkpoints(name)
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
    help="from the repository: pages on demand, or all first (default: restore.lazy)",
)
def restore(
    config: Config, as_json: bool, name: str, checkpoint_id: str | None, lazy: bool | None
) -> None:
    """Restore NAME, which must not be running, from a checkpoint."""
    with show.progress(as_json, f"restoring {name}") as on_progress:
        r = Client(config.socket_path).restore(
            name, checkpoint_id, on_progress=on_progress, lazy=lazy
        )
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
def rollback(config: Config, as_json: bool, name: str, to: str | None, back: int | None) -> None:
    """Stop the running NAME and restore an older checkpoint. Its current state is lost."""
    if (to is None) == (back is None):
        raise click.UsageError("give exactly one of --to ID and --back N")
    r = Client(config.socket_path).rollback(name, to=to, back=back)
    show.emit(as_json, r, lambda: show.rolled_back(name, r))


@cli.command()
@common()
@click.argument("name")
@click.option("--to", "to", required=True, help="the host id of the fleet to move it to")
def migrate(config: Config, as_json: bool, name: str, to: str) -> None:
    """Move NAME to another host of the fleet: final checkpoint, hand-over, stopped here."""
    r = Client(config.socket_path).migrate(name, to)
    show.emit(as_json, r, lambda: show.migrated(r))


@cli.command()
@common()
def hosts(config: Config, as_json: bool) -> None:
    """The fleet's live hosts and the workloads each owns."""
    rows = Client(config.socket_path).hosts()
    show.emit(as_json, rows, lambda: show.hosts_table(rows))


@cli.command()
@common()
@click.argument("name", required=False)
@click.option("--dry-run", is_flag=True, help="show what would be removed, remove nothing")
def prune(config: Config, as_json: bool, name: str | None, dry_run: bool) -> None:
    """Apply retention now (NAME or every workload), then collect unreferenced packs."""
    r = Client(config.socket_path).prune(name, dry_run=dry_run)
    show.emit(as_json, r, lambda: show.prune_report(r, dry_run))


@cli.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id", required=False)
def verify(config: Config, as_json: bool, name: str, checkpoint_id: str | None) -> None:
    """Re-hash every chunk of a checkpoint (default: the newest) in the repository."""
    with show.progress(as_json, f"verifying {name}") as on_progress:
        r = Client(config.socket_path).verify(name, checkpoint_id, on_progress=on_progress)
    show.emit(as_json, r, lambda: show.verified(name, r))


@cli.command()
@common()
@click.argument("name")
@click.argument("checkpoint_id")
@click.option("--remove", is_flag=True, help="unpin instead")
def pin(config: Config, as_json: bool, name: str, checkpoint_id: str, remove: bool) -> None:
    """Keep a checkpoint whatever retention says (or --remove the pin)."""
    r = Client(config.socket_path).pin(name, checkpoint_id, unpin=remove)
    show.emit(as_json, r, lambda: show.pinned(name, checkpoint_id, r))


@cli.command()
@common()
def doctor(config: Config, as_json: bool) -> None:
    """Check CRIU, kernel features, storage and permissions; say how to fix what is missing."""
    from checkpointer.doctor import run_checks

    checks = run_checks(config)
    show.emit(as_json, [c.as_dict() for c in checks], lambda: show.doctor_table(checks))
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


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


def _add_key_commands() -> None:
    from checkpointer.cli.fleet_commands import drain, shutdown_checkpoint
    from checkpointer.cli.key_commands import key  # these import `common` from here

    cli.add_command(key)
    cli.add_command(drain)
    cli.add_command(shutdown_checkpoint)


_add_key_commands()


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
