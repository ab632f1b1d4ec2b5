"""What every command shares: --config and --json (before or after the command name), known
errors and usage errors turned into one line, and the workload flags of `run` and `register`.

Its own module so that the command modules (commands, key_commands, fleet_commands) all import
it, and none of them another: the group adds the others' commands without an import circle.

Starting fast: a command that talks to the daemon is given the socket's path
(config/document.py), not the validated Config; only those that read the config (`daemon`,
`doctor`, `key`) load the schema and pydantic, inside the command. Tables (rich) load in
rendering.py when one is printed.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from checkpointer.config.document import socket_path
from checkpointer.errors import CheckpointerError, DaemonUnavailable
from storage.errors import StorageError

if TYPE_CHECKING:
    from checkpointer.config import Config

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` (one line, no traceback) and exit with `code`."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def usage_error(e: click.UsageError) -> NoReturn:
    """A usage error in one line, with where to read the usage (click prints three)."""
    where = e.ctx.command_path if e.ctx else "checkpointer"
    fail(f"{e.format_message().rstrip('.')} (see `{where} --help`)", e.exit_code)


@dataclass(frozen=True)
class GlobalOptions:
    """--config and --json given before the command name (the group's options)."""

    config_path: Path | None = None
    as_json: bool = False


def _before_command() -> GlobalOptions:
    obj = click.get_current_context().find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def config_option() -> Callable[[F], F]:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help="config file (default: $CHECKPOINTER_CONFIG, "
        "/etc/checkpointer/config.yaml, or built-in defaults)",
    )


def common(reporting: bool = True, reads_config: bool = False) -> Callable[[F], F]:
    """--config on every command, --json on reporting ones; turn known errors into one line.

    The command is called with the daemon's socket path (`socket_path: Path`) first, or with
    `reads_config` the validated Config (`config: Config`). When the daemon cannot be reached,
    the whole config is validated then, and its error, if any, is the one printed (a typo in
    the file, not "no daemon"); a daemon that answers runs on the config it validated at its
    start. Either option left out after the command name takes its value from before it."""

    def wrap(fn: F) -> F:
        @config_option()
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
                if reads_config:
                    return fn(_validated(config_path), **kw)
                try:
                    return fn(socket_path(config_path), **kw)
                except DaemonUnavailable:
                    _validated(config_path)  # a bad config is the likelier cause: say that
                    raise
            except CheckpointerError as e:
                fail(str(e), 2 if e.kind == "config" else 1)
            except StorageError as e:
                fail(str(e))
            except ValueError as e:
                fail(str(e), 2)

        if reporting:
            inner = click.option(
                "--json", "as_json", is_flag=True, help="print JSON instead of a table"
            )(inner)
        return inner  # type: ignore[return-value]

    return wrap


def _validated(config_path: Path | None) -> Config:
    """The whole config, validated (pydantic and the schema: ~0.27 s, loaded only here)."""
    from checkpointer.config import load_config

    return load_config(config_path)


def criu_flags(fn: F) -> F:
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


def schedule_flags(fn: F) -> F:
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
        "--drill-every",
        help="restore the newest checkpoint in a sandbox this often, e.g. 1d (restore drills)",
    )(fn)
    fn = click.option(
        "--lazy-restore",
        is_flag=True,
        help="restores from the repository start the tree first, its memory on demand",
    )(fn)
    return fn


def workload_options(kw: dict[str, Any]) -> dict[str, Any]:
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
    drill_every = kw.pop("drill_every")
    if drill_every is not None:
        opts["drill"] = {"every": drill_every}
    try:
        WorkloadOptions.model_validate(opts)
    except ValidationError as e:
        raise ConfigError(f"invalid workload options: {format_validation_error(e, opts)}") from e
    return opts
