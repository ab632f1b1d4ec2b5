"""Run CRIU: check, dump (leave running), restore (detached). Nothing else runs CRIU.

We drive the `criu` command line, not `criu swrk` RPC: the CLI has everything we need
(`--leave-running`, `--pidfile`, `--restore-detached`), its failures are the ones operators
find documented, and the verbose log it writes is what we keep for every failed attempt.
Statistics come from the `stats-dump`/`stats-restore` images, not from printed text.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from checkpointer.criu import stale_proc_dir
from checkpointer.criu.failures import INSTALL_HINT, CriuError, CriuFailure, classify
from checkpointer.criu.images.stats import (
    DumpStats,
    RestoreStats,
    read_dump_stats,
    read_restore_stats,
)
from checkpointer.criu.options import DumpOptions
from checkpointer.host import children
from checkpointer.workloads import users

MIN_VERSION = (4, 2)

# One dump at a time. A process whose /proc is not its PID namespace's (every managed workload:
# PID 1 of its own namespace, the host's /proc) gets a private procfs from CRIU's parasite,
# mounted on "proc.crtools" created in the process's working directory. Two dumps of trees that
# share a working directory collide on that name (EEXIST) and one fails: measured as 2 failed
# checkpoints in 200 with 100 workloads started in one folder. Dumps are short and CPU-bound,
# so running them one after the other costs little; the lock is taken before the tree is frozen,
# so it never lengthens a workload's pause.
_DUMP_LOCK = threading.Lock()

# Pauses (seconds) before each new dump of a tree whose dump CRIU refused for a connection
# not yet accepted by a listening socket ("In-flight connection"): a busy server's accept
# queue is empty again within milliseconds, so 5 attempts over 150 ms rarely all meet one.
# CRIU thaws the tree after a failed dump (--leave-running, --leave-stopped alike), so each
# attempt starts from a running tree; the lock is released during the pause.
IN_FLIGHT_PAUSES = (0.01, 0.02, 0.04, 0.08)
logger = logging.getLogger(__name__)


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
                CriuFailure.CRIU_MISSING,
            )
        return found

    def version(self) -> str:
        out = children.run([self.exe(), "--version"], timeout=30, capture_output=True)
        m = re.search(r"Version:\s*(\S+)", out.stdout)
        if not m:
            raise CriuError(
                f"cannot tell the version of {self.binary}: {out.stdout.strip()!r}",
                CriuFailure.CRIU_MISSING,
            )
        return m.group(1)

    def require_version(self) -> str:
        v = self.version()
        parts = tuple(int(x) for x in re.findall(r"\d+", v)[:2])
        if parts < MIN_VERSION:
            raise CriuError(
                f"CRIU {v} is too old (need >= 4.2 on this kernel); {INSTALL_HINT}",
                CriuFailure.CRIU_TOO_OLD,
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
        blocker = users.dump_blocker(pid)
        if blocker is not None:  # before CRIU freezes the tree and writes its memory for nothing
            raise CriuError(
                f"criu dump of {label} cannot succeed: {blocker.message}", blocker.category
            )
        for attempt, pause in enumerate((*IN_FLIGHT_PAUSES, None)):
            try:
                self.dump_once(pid, cmd, log, label)
                break
            except CriuError as e:
                if e.category != CriuFailure.IN_FLIGHT_CONNECTION or pause is None:
                    raise
                if attempt == 0:
                    logger.info("criu dump of %s met %s; trying again", label, e.category)
                if e.log is not None:
                    e.log.unlink(missing_ok=True)  # a moment's refusal, not a failure to keep
                _empty(images_dir)
                time.sleep(pause)
        log.unlink(missing_ok=True)
        return read_dump_stats(images_dir)

    def dump_once(self, pid: int, cmd: list[str], log: Path, label: str) -> None:
        """One `criu dump`, under the dump lock; a stale proc.crtools is removed and the dump
        run once more."""
        with _DUMP_LOCK:
            try:
                self.run_logged(cmd, log, label, "dump")
            except CriuError as e:
                if e.category != CriuFailure.PROC_DIR_EXISTS or not stale_proc_dir.clear(pid):
                    raise
                self.run_logged(cmd, log, label, "dump")  # once more, the leftover gone

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
        try:
            pid = self.restore_tree(images_dir, opts, label, inherit)
        finally:
            restore_log(images_dir).unlink(missing_ok=True)
        return pid, read_restore_stats(images_dir)

    def restore_tree(
        self,
        images_dir: Path,
        opts: DumpOptions,
        label: str,
        inherit: Sequence[tuple[int, str]] = (),
        *,
        lazy: bool = False,
        action_script: str | None = None,
    ) -> int:
        """Run `criu restore` detached and return the restored root's host PID: the one
        restore of full and lazy restores alike (`lazy`: the pages CRIU marked lazy come from
        a running `criu lazy-pages`; `action_script`: its guard's hook). On success CRIU's log
        stays at `restore_log(images_dir)` for the caller; a failure raises CriuError with the
        log kept."""
        log = restore_log(images_dir)
        pidfile = images_dir.parent / f"{images_dir.name}.pid"
        pidfile.unlink(missing_ok=True)
        cmd = restore_argv(self.exe(), images_dir, pidfile, log, opts, inherit, lazy=lazy)
        if action_script is not None:
            cmd += ["--action-script", action_script]
        self.run_logged(cmd, log, label, "restore", pass_fds=tuple(fd for fd, _ in inherit))
        try:
            return int(pidfile.read_text().strip())
        finally:
            pidfile.unlink(missing_ok=True)

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
                CriuFailure.TIMEOUT,
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


def _empty(images_dir: Path) -> None:
    """Remove what a refused dump wrote, so the next attempt's images are its own only."""
    for entry in images_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def restore_log(images_dir: Path) -> Path:
    """Where `criu restore` of `images_dir` writes its log: beside the folder, not in it."""
    return images_dir.parent / f"{images_dir.name}.restore.log"


def restore_argv(
    exe: str,
    images_dir: Path,
    pidfile: Path,
    log: Path,
    opts: DumpOptions,
    inherit: Sequence[tuple[int, str]] = (),
    *,
    lazy: bool = False,
) -> list[str]:
    """The `criu restore` command line, built once for full and lazy restores so that both
    pass the workload's options (a lazy restore that forgot --tcp-close would fail only there)."""
    cmd = [
        *(exe, "restore", "--images-dir", str(images_dir)),
        *(["--lazy-pages"] if lazy else []),
        *("--restore-detached", "--pidfile", str(pidfile)),
        *("--log-file", str(log), "-v4"),
        *opts.common_args(),
        *opts.extra_args("restore"),
    ]
    for fd, resource in inherit:
        cmd += ["--inherit-fd", f"fd[{fd}]:{resource}"]
    if opts.tcp_close:
        cmd.append("--tcp-close")
    return cmd
