"""Run CRIU: check, dump (leave running), restore (detached). Nothing else runs CRIU.

We drive the `criu` command line, not `criu swrk` RPC: the CLI has everything we need
(`--leave-running`, `--pidfile`, `--restore-detached`), its failures are the ones operators
find documented, and the verbose log it writes is what we keep for every failed attempt.
Statistics come from the `stats-dump`/`stats-restore` images, not from printed text.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from checkpointer import children
from checkpointer.criu import stale_proc_dir
from checkpointer.criu.stats import DumpStats, RestoreStats, read_dump_stats, read_restore_stats
from checkpointer.errors import CheckpointerError

MIN_VERSION = (4, 2)

# One dump at a time. A process whose /proc is not its PID namespace's (every managed workload:
# PID 1 of its own namespace, the host's /proc) gets a private procfs from CRIU's parasite,
# mounted on "proc.crtools" created in the process's working directory. Two dumps of trees that
# share a working directory collide on that name (EEXIST) and one fails: measured as 2 failed
# checkpoints in 200 with 100 workloads started in one folder. Dumps are short and CPU-bound,
# so running them one after the other costs little; the lock is taken before the tree is frozen,
# so it never lengthens a workload's pause.
_DUMP_LOCK = threading.Lock()
INSTALL_HINT = "run `make setup` (scripts/install-criu.sh) as root to build and install CRIU 4.2.1"


class CriuError(CheckpointerError):
    """A CRIU operation failed. `category` lets policy branch; `log` is the kept CRIU log."""

    kind = "criu"

    def __init__(self, message: str, category: str = "unknown", log: Path | None = None) -> None:
        super().__init__(message + (f" (CRIU log: {log})" if log else ""))
        self.category = category
        self.log = log


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
            raise CriuError(f"criu.extra_options: {e}", "bad-option") from e


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
    "(checkpointer/criu/lazy.py), with its own pages"
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


# (pattern in CRIU's log, category, what the operator should do). First match wins, so the
# specific causes come before the generic ones.
_CLASSIFY: list[tuple[re.Pattern[str], str, str]] = [
    (
        re.compile(r"Can't dump ghost file .* increase limit"),
        "ghost-file-too-large",
        "a process holds open a deleted file larger than CRIU saves by default (1M); raise the "
        "limit for this workload (criu.extra_options: [--ghost-limit=64M], or `--criu-opt "
        "--ghost-limit=64M`), or have it close the file",
    ),
    (
        re.compile(r"Can't create link remap"),
        "unlinked-file",
        "a process holds open a file deleted under the name it was opened by but still linked "
        "under another; CRIU cannot checkpoint that while the tree keeps running (see README, "
        "What CRIU cannot checkpoint); have it close or reopen the file",
    ),
    (
        re.compile(r"Can't fork for \d+: File exists|PID \d+ .*already"),
        "pid-in-use",
        "a process already holds a PID the checkpoint needs; stop it, or run the workload with "
        "`checkpointer run` (own PID namespace) so restores never compete for host PIDs",
    ),
    (
        re.compile(r"has bad size|bad build-ID|bad mode|size mismatch|was changed"),
        "file-changed",
        "a file the process had open changed since the checkpoint (CRIU never saves file "
        "contents); restore the file, or restore an older or newer checkpoint",
    ),
    (
        re.compile(r"Connected TCP socket|TCP connection.*(established|locked)"),
        "tcp-established",
        "the tree has established TCP connections; set criu.tcp_established: true for it",
    ),
    (
        re.compile(r"External socket is used|ext.unix|Can't dump half of stream unix"),
        "external-unix-socket",
        "the tree has a unix socket connected outside it; set criu.ext_unix_sk: true or close it",
    ),
    (
        re.compile(r"file locks|Some file locks are hold"),
        "file-locks",
        "the tree holds file locks; set criu.file_locks: true for it",
    ),
    (
        re.compile(r"not a session leader|shell.job|Found dangling tty|tty"),
        "tty",
        "the tree uses a terminal; set criu.shell_job: true, or run it without a terminal",
    ),
    (
        re.compile(r"Address already in use"),
        "address-in-use",
        "a socket address the checkpoint listens on is taken; stop whatever holds it",
    ),
    (
        re.compile(r"vDSO|vdso"),
        "criu-too-old",
        f"this CRIU does not support the running kernel; {INSTALL_HINT}",
    ),
    (
        re.compile(r"No process with pid|Can't seize|No such process|ESRCH"),
        "process-gone",
        "the process is gone; `checkpointer status` shows the workload's state",
    ),
    (
        re.compile(r"Can't create a directory \(-17\)"),
        "proc-dir-exists",
        "CRIU could not create its temporary proc.crtools directory in the working directory of "
        "a process of the tree (see /proc/PID/cwd): another CRIU run is dumping a process with "
        "the same working directory, or an interrupted one left the empty directory behind; "
        "remove it when no CRIU is running",
    ),
    (
        re.compile(r"Operation not permitted|Permission denied|EPERM"),
        "permission",
        "CRIU needs root with all capabilities; run the daemon as root",
    ),
]


def classify(log_text: str) -> tuple[str, str, str]:
    """(category, first error line, advice) for a failed CRIU run."""
    errors = [
        ln
        for ln in log_text.splitlines()
        if "Error" in ln and "RLIMIT_NOFILE" not in ln and "kdat cache" not in ln
    ]
    first = errors[0].split(": ", 1)[-1].strip() if errors else "CRIU failed without an error line"
    for pattern, category, advice in _CLASSIFY:
        for line in errors or log_text.splitlines():
            if pattern.search(line):
                return category, first, advice
    return "unknown", first, "read the CRIU log for the cause"


class Criu:
    """One CRIU binary, with where its logs of failed runs are kept."""

    def __init__(self, binary: str, failed_logs_dir: Path, timeout: float = 600.0) -> None:
        self.binary = binary
        self.failed_logs_dir = failed_logs_dir
        self.timeout = timeout

    def exe(self) -> str:
        found = shutil.which(self.binary)
        if not found:
            raise CriuError(
                f"CRIU ({self.binary}) is not installed or not on PATH; {INSTALL_HINT}",
                "criu-missing",
            )
        return found

    def version(self) -> str:
        out = children.run([self.exe(), "--version"], timeout=30, capture_output=True)
        m = re.search(r"Version:\s*(\S+)", out.stdout)
        if not m:
            raise CriuError(
                f"cannot tell the version of {self.binary}: {out.stdout.strip()!r}", "criu-missing"
            )
        return m.group(1)

    def require_version(self) -> str:
        v = self.version()
        parts = tuple(int(x) for x in re.findall(r"\d+", v)[:2])
        if parts < MIN_VERSION:
            raise CriuError(
                f"CRIU {v} is too old (need >= 4.2 on this kernel); {INSTALL_HINT}", "criu-too-old"
            )
        return v

    def check(self, extra: list[str] | None = None) -> tuple[bool, str]:
        """`criu check` (plus `extra` args): whether it passed, and what it printed."""
        out = children.run([self.exe(), "check", *(extra or [])], timeout=120, capture_output=True)
        text = "\n".join(
            ln
            for ln in (out.stdout + out.stderr).splitlines()
            if "RLIMIT_NOFILE" not in ln and "kdat cache" not in ln
        )
        return out.returncode == 0, text.strip()

    def dump(
        self, pid: int, images_dir: Path, opts: DumpOptions, label: str, final: bool = False
    ) -> DumpStats:
        """Checkpoint the tree rooted at `pid` into `images_dir`; the tree keeps running, or
        with `final` stays stopped (SIGSTOP) so that nothing changes after the checkpoint: a
        migration then kills it, or thaws it (SIGCONT) if the hand-over failed."""
        log = images_dir.parent / f"{images_dir.name}.dump.log"
        cmd = [
            self.exe(),
            "dump",
            "--tree",
            str(pid),
            "--images-dir",
            str(images_dir),
            "--leave-stopped" if final else "--leave-running",
            "--log-file",
            str(log),
            "-v4",
            *opts.common_args(),
            *opts.extra_args("dump"),
        ]
        with _DUMP_LOCK:
            try:
                self.run_logged(cmd, log, label, "dump")
            except CriuError as e:
                if e.category != "proc-dir-exists" or not stale_proc_dir.clear(pid):
                    raise
                self.run_logged(cmd, log, label, "dump")  # once more, the leftover gone
        log.unlink(missing_ok=True)
        return read_dump_stats(images_dir)

    def restore(
        self,
        images_dir: Path,
        opts: DumpOptions,
        label: str,
        inherit: Sequence[tuple[int, str]] = (),
    ) -> tuple[int, RestoreStats]:
        """Restore the tree detached; return the root's host PID. The caller reaps it.

        `inherit`: (fd, resource) pairs: the file CRIU would reopen as `resource` (a path
        without its leading slash, `pipe[INODE]`...) is the caller's open fd instead."""
        log = images_dir.parent / f"{images_dir.name}.restore.log"
        pidfile = images_dir.parent / f"{images_dir.name}.pid"
        pidfile.unlink(missing_ok=True)
        cmd = [
            self.exe(),
            "restore",
            "--images-dir",
            str(images_dir),
            "--restore-detached",
            "--pidfile",
            str(pidfile),
            "--log-file",
            str(log),
            "-v4",
            *opts.common_args(),
            *opts.extra_args("restore"),
        ]
        for fd, resource in inherit:
            cmd += ["--inherit-fd", f"fd[{fd}]:{resource}"]
        if opts.tcp_close:
            cmd.append("--tcp-close")
        self.run_logged(cmd, log, label, "restore", pass_fds=tuple(fd for fd, _ in inherit))
        try:
            pid = int(pidfile.read_text().strip())
        finally:
            pidfile.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
        return pid, read_restore_stats(images_dir)

    def run_logged(
        self, cmd: list[str], log: Path, label: str, op: str, pass_fds: tuple[int, ...] = ()
    ) -> None:
        """Run one CRIU command writing `log`; a failure raises CriuError, classified, with
        the log kept (lazy restores run their commands through here too)."""
        try:
            out = children.run(
                cmd,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                pass_fds=pass_fds,
            )
        except subprocess.TimeoutExpired as e:
            kept = self.keep_log(log, label, op)
            raise CriuError(
                f"criu {op} of {label} took longer than {self.timeout:.0f}s and was "
                "killed; raise criu.timeout if the tree is that large",
                "timeout",
                kept,
            ) from e
        if out.returncode == 0:
            return
        text = log.read_text(errors="replace") if log.exists() else out.stderr
        category, first, advice = classify(text + "\n" + out.stderr)
        kept = self.keep_log(log, label, op)
        raise CriuError(f"criu {op} of {label} failed: {first}; {advice}", category, kept)

    def keep_log(self, log: Path, label: str, op: str) -> Path | None:
        """Move a failed run's log among the kept ones; its new path (None if it has none)."""
        if not log.exists():
            return None
        self.failed_logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        kept = self.failed_logs_dir / f"{label}-{stamp}-{os.getpid()}-{op}.log"
        shutil.move(str(log), kept)
        return kept
