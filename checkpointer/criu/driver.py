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
from dataclasses import dataclass
from pathlib import Path

from checkpointer import children
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


# (pattern in CRIU's log, category, what the operator should do). First match wins, so the
# specific causes come before the generic ones.
_CLASSIFY: list[tuple[re.Pattern[str], str, str]] = [
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

    def _exe(self) -> str:
        found = shutil.which(self.binary)
        if not found:
            raise CriuError(
                f"CRIU ({self.binary}) is not installed or not on PATH; {INSTALL_HINT}",
                "criu-missing",
            )
        return found

    def version(self) -> str:
        out = children.run([self._exe(), "--version"], timeout=30, capture_output=True)
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
        out = children.run([self._exe(), "check", *(extra or [])], timeout=120, capture_output=True)
        text = "\n".join(
            ln
            for ln in (out.stdout + out.stderr).splitlines()
            if "RLIMIT_NOFILE" not in ln and "kdat cache" not in ln
        )
        return out.returncode == 0, text.strip()

    def dump(self, pid: int, images_dir: Path, opts: DumpOptions, label: str) -> DumpStats:
        """Checkpoint the tree rooted at `pid` into `images_dir`; the tree keeps running."""
        log = images_dir.parent / f"{images_dir.name}.dump.log"
        cmd = [
            self._exe(),
            "dump",
            "--tree",
            str(pid),
            "--images-dir",
            str(images_dir),
            "--leave-running",
            "--log-file",
            str(log),
            "-v4",
            *opts.common_args(),
        ]
        with _DUMP_LOCK:
            self._run(cmd, log, label, "dump")
        log.unlink(missing_ok=True)
        return read_dump_stats(images_dir)

    def restore(self, images_dir: Path, opts: DumpOptions, label: str) -> tuple[int, RestoreStats]:
        """Restore the tree detached; return the root's host PID. The caller reaps it."""
        log = images_dir.parent / f"{images_dir.name}.restore.log"
        pidfile = images_dir.parent / f"{images_dir.name}.pid"
        pidfile.unlink(missing_ok=True)
        cmd = [
            self._exe(),
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
        ]
        if opts.tcp_close:
            cmd.append("--tcp-close")
        self._run(cmd, log, label, "restore")
        try:
            pid = int(pidfile.read_text().strip())
        finally:
            pidfile.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
        return pid, read_restore_stats(images_dir)

    def _run(self, cmd: list[str], log: Path, label: str, op: str) -> None:
        try:
            out = children.run(
                cmd, timeout=self.timeout, stdin=subprocess.DEVNULL, capture_output=True
            )
        except subprocess.TimeoutExpired as e:
            kept = self._keep_log(log, label, op)
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
        kept = self._keep_log(log, label, op)
        raise CriuError(f"criu {op} of {label} failed: {first}; {advice}", category, kept)

    def _keep_log(self, log: Path, label: str, op: str) -> Path | None:
        if not log.exists():
            return None
        self.failed_logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        kept = self.failed_logs_dir / f"{label}-{stamp}-{os.getpid()}-{op}.log"
        shutil.move(str(log), kept)
        return kept
