"""What CRIU is told about a workload: its resources (`DumpOptions`), and the extra options
an operator may add (criu.extra_options, `--criu-opt`), checked against an allow-list.

The same options go to the dump and, again, to every restore of its images (full or lazy), so
they are typed once here and turned into argv by the driver.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from checkpointer.criu.failures import CriuError, CriuFailure


@dataclass(frozen=True)
class DumpOptions:
    """What CRIU must be told about a tree's resources, on dump and again on restore."""

    tcp_established: bool = False
    file_locks: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    tcp_close: bool = False
    extra_options: tuple[str, ...] = ()  # canonical, from check_extra_options

    def common_args(self) -> list[str]:
        args = []
        if self.tcp_established:
            args.append("--tcp-established")
        if self.file_locks:
            args.append("--file-locks")
        if self.ext_unix_sk:
            args.append("--ext-unix-sk")
        if self.shell_job:
            args.append("--shell-job")
        return args

    def extra_args(self, op: Literal["dump", "restore"]) -> list[str]:
        """The allowed extra options that apply to `op`, as separate argv elements."""
        try:
            return extra_argv(check_extra_options(self.extra_options), op)
        except ValueError as e:
            raise CriuError(f"criu.extra_options: {e}", CriuFailure.BAD_OPTION) from e


# Extra CRIU options (criu.extra_options, `--criu-opt`): an allow-list, never a deny-list, as
# every CRIU option not known to be safe here may break the service (where images go, how the
# tree is left, which logs and pidfiles are read) or run programs as root.


@dataclass(frozen=True)
class ExtraOption:
    """An allowed option: whether it takes a value, which runs it applies to, what it does."""

    value: Literal["none", "optional", "required"]
    dump: bool
    restore: bool
    what: str
    check: Callable[[str], str] | None = None  # the value as passed on; ValueError if bad


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v

    return check


def _criu_size(v: str) -> str:
    # CRIU's own grammar (parse_size in criu/config.c): K, M and G are powers of 1024.
    m = re.fullmatch(r"(\d{1,19})([KMG]?)", v)
    if not m:
        raise ValueError(f"{v!r} is not a size as CRIU reads it: bytes, or a number and K, M or G")
    if int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)] >= 2**63:
        raise ValueError(f"{v!r} is too large")
    return v


def _absolute_path(v: str) -> str:
    if not v.startswith("/") or "\0" in v:
        raise ValueError(f"{v!r} is not an absolute path")
    return v


ALLOWED_EXTRA_OPTIONS: dict[str, ExtraOption] = {
    "--manage-cgroups": ExtraOption(
        "optional",
        True,
        True,
        "dump and restore the tree's cgroups; mode none, props, soft (CRIU's default), full, "
        "strict or ignore",
        _one_of("none", "props", "soft", "full", "strict", "ignore"),
    ),
    "--force-irmap": ExtraOption(
        "none", True, False, "resolve the paths of inotify/fanotify watches on dump"
    ),
    "--irmap-scan-path": ExtraOption(
        "required",
        True,
        False,
        "an absolute path where CRIU looks for watched files",
        _absolute_path,
    ),
    "--ghost-limit": ExtraOption(
        "required",
        True,
        False,
        "largest deleted-but-open file saved into the image (CRIU's default 1M)",
        _criu_size,
    ),
    "--ghost-fiemap": ExtraOption(
        "none", True, False, "save deleted-but-open sparse files by their extents"
    ),
    "--evasive-devices": ExtraOption(
        "none", True, False, "accept a device file that is now reached by another path"
    ),
    "--skip-in-flight": ExtraOption(
        "none", True, False, "drop TCP connections not yet accepted instead of failing"
    ),
    "--file-validation": ExtraOption(
        "required",
        True,
        True,
        "how files are checked unchanged on restore: filesize or buildid (default)",
        _one_of("filesize", "buildid"),
    ),
    "--weak-sysctls": ExtraOption(
        "none", False, True, "skip restoring sysctls this kernel does not have"
    ),
    "--skip-file-rwx-check": ExtraOption(
        "none", False, True, "do not check the permissions of files on restore"
    ),
}

_DEDICATED = "has its own setting: criu.{key}: true in the config, --{flag} on the command line"
_INCREMENTAL = (
    "every checkpoint is a full image, stored deduplicated: images of a previous dump are not "
    "kept where CRIU would look for them, and dedup would punch pages out of kept images"
)
_PAGE_SERVER = (
    "a lazy restore needs a page server and a lazy-pages daemon: the service runs both itself "
    "(checkpointer/criu/lazy/), with its own pages"
)
REFUSED_EXTRA_OPTIONS: dict[str, str] = {
    "--images-dir": "the service chooses where images go (scratch, then the repository)",
    "--work-dir": "the service reads CRIU's logs, pidfile and statistics where it put them",
    "--tree": "the service passes the workload's PID",
    "--restore-detached": "the service always restores detached, and reaps the tree itself",
    "--daemon": "the service always restores detached, and reaps the tree itself",
    "--restore-sibling": "the service always restores detached, and reaps the tree itself",
    "--leave-running": "every checkpoint leaves the tree running; the service passes it",
    "--leave-stopped": "a checkpoint must leave the tree running",
    "--log-file": "the service keeps CRIU's log of every failed run (CRIU log in the error)",
    "--log-pid": "the service keeps one CRIU log per run",
    "--verbosity": "the service logs at -v4, so the log of a failed run has everything",
    "--pidfile": "the service reads the restored tree's PID from its own pidfile",
    "--exec-cmd": "the restored tree's parent must be CRIU, detached, for the service to reap it",
    "--action-script": "it runs a program as root at every step of every dump and restore",
    "--config": "CRIU would read more options from a file, past this allow-list",
    "--prev-images-dir": _INCREMENTAL,
    "--track-mem": _INCREMENTAL,
    "--auto-dedup": _INCREMENTAL,
    "--lazy-pages": _PAGE_SERVER,
    "--page-server": _PAGE_SERVER,
    "--inherit-fd": "the service passes no file descriptors to restored trees",
    "--display-stats": "the service reads CRIU's statistics images (`checkpointer list`, metrics)",
    "--link-remap": "with --leave-running, which every checkpoint uses, CRIU deletes the "
    "link_remap file at the end of the dump, so the checkpoint can never be restored "
    "(restore fails: Can't link .../link_remap.N); see README, What CRIU cannot checkpoint",
    "--shell-job": _DEDICATED.format(key="shell_job", flag="shell-job"),
    "--tcp-established": _DEDICATED.format(key="tcp_established", flag="tcp-established"),
    "--file-locks": _DEDICATED.format(key="file_locks", flag="file-locks"),
    "--ext-unix-sk": _DEDICATED.format(key="ext_unix_sk", flag="ext-unix-sk"),
    "--tcp-close": "has its own setting: criu.tcp_close: true in the config",
}
_SHORT = {
    "-D": "--images-dir",
    "-W": "--work-dir",
    "-t": "--tree",
    "-d": "--restore-detached",
    "-S": "--restore-sibling",
    "-R": "--leave-running",
    "-s": "--leave-stopped",
    "-o": "--log-file",
    "-v": "--verbosity",
    "-j": "--shell-job",
    "-l": "--file-locks",
    "-x": "--ext-unix-sk",
}


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"CRIU option {name} is refused: {why}")


def check_extra_options(items: Sequence[object]) -> list[str]:
    """The extra CRIU options in canonical form, one item each: `--opt` or `--opt=value`.

    Takes `--opt=value`, `--opt value` (one item) or `--opt`, `value` (two items); refuses,
    naming the option and why, anything not in ALLOWED_EXTRA_OPTIONS. Canonical input comes
    back unchanged. Raises ValueError.
    """
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a CRIU option: give strings such as --force-irmap")
        text = item.strip()
        if "\0" in text:
            raise ValueError(f"{text!r}: a CRIU option cannot hold a NUL byte")
        if not text.startswith("--"):
            if text.startswith("-") and len(text) > 1:
                long = _SHORT.get(text[:2])
                why = REFUSED_EXTRA_OPTIONS.get(long, "") if long else ""
                raise _refuse(text, why or "write the long form (--name) of an allowed option")
            raise ValueError(
                f"{text!r} is not a CRIU option (they start with --); write a value as "
                "--option=value"
            )
        name, sep, value = text.partition("=")
        spaced = False
        if not sep and len(text.split(None, 1)) == 2:
            name, value = text.split(None, 1)
            sep, spaced = "=", True
        if name in REFUSED_EXTRA_OPTIONS:
            raise _refuse(name, REFUSED_EXTRA_OPTIONS[name])
        spec = ALLOWED_EXTRA_OPTIONS.get(name)
        if spec is None:
            raise ValueError(
                f"CRIU option {name} is not allowed; allowed: "
                + ", ".join(sorted(ALLOWED_EXTRA_OPTIONS))
            )
        if name in seen:
            raise ValueError(f"CRIU option {name} is given twice")
        seen.add(name)
        if spaced and spec.value == "none":
            raise ValueError(f"{text!r}: write one CRIU option per item")
        if spec.value == "none":
            if sep:
                raise ValueError(f"CRIU option {name} takes no value")
            out.append(name)
            continue
        if not sep and i < len(items):
            nxt = items[i]
            if isinstance(nxt, str) and nxt.strip() and not nxt.strip().startswith("-"):
                value, sep = nxt.strip(), "="
                i += 1
        if not sep:
            if spec.value == "required":
                raise ValueError(f"CRIU option {name} needs a value: {name}=VALUE ({spec.what})")
            out.append(name)
            continue
        value = value.strip()
        try:
            value = spec.check(value) if spec.check else value
        except ValueError as e:
            raise ValueError(f"CRIU option {name}: {e} ({spec.what})") from None
        out.append(f"{name}={value}")
    return out


def extra_argv(canonical: Sequence[str], op: Literal["dump", "restore"]) -> list[str]:
    """argv elements for `op` from canonical options; a required value is its own element
    (getopt takes an optional one only attached: --manage-cgroups=soft)."""
    args: list[str] = []
    for opt in canonical:
        name, sep, value = opt.partition("=")
        spec = ALLOWED_EXTRA_OPTIONS[name]
        if not (spec.dump if op == "dump" else spec.restore):
            continue
        if sep and spec.value == "required":
            args += [name, value]
        else:
            args.append(opt)
    return args
