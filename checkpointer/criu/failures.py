"""CRIU's failures: the error every CRIU operation raises, and what a failed run's log says.

`classify` reads a CRIU log and names the cause as a `CriuFailure` that policy branches on (a
restore that failed with `pid-in-use` is tried again later, one with `file-changed` marks the
checkpoint bad: engine/policy.py), with the advice an operator needs. Used by the driver,
the lazy restore, the restore drill's sandbox and the container runtimes, which run CRIU
through their own tools. The categories (criu/failure_category.py, an enum that imports
nothing, because errors.py imports engine/states.py, which re-exports it) are re-exported here
for the producers.
"""

from __future__ import annotations

import re
from pathlib import Path

from checkpointer.criu.failure_category import CriuFailure as CriuFailure
from checkpointer.errors import CheckpointerError

INSTALL_HINT = "run `make setup` (scripts/install-criu.sh) as root to build and install CRIU 4.2.1"


class CriuError(CheckpointerError):
    """A CRIU operation failed. `category` lets policy branch; `log` is the kept CRIU log."""

    kind = "criu"

    def __init__(
        self, message: str, category: CriuFailure = CriuFailure.UNKNOWN, log: Path | None = None
    ) -> None:
        super().__init__(message + (f" (CRIU log: {log})" if log else ""))
        self.category = category
        self.log = log


# (pattern in CRIU's log, category, what the operator should do). First match wins, so the
# specific causes come before the generic ones.
_CLASSIFY: list[tuple[re.Pattern[str], CriuFailure, str]] = [
    (
        re.compile(r"Can't dump ghost file .* increase limit"),
        CriuFailure.GHOST_FILE_TOO_LARGE,
        "a process holds open a deleted file larger than CRIU saves by default (1M); raise the "
        "limit for this workload (criu.extra_options: [--ghost-limit=64M], or `--criu-opt "
        "--ghost-limit=64M`), or have it close the file",
    ),
    (
        re.compile(r"Can't create link remap"),
        CriuFailure.UNLINKED_FILE,
        "a process holds open a file deleted under the name it was opened by but still linked "
        "under another; CRIU cannot checkpoint that while the tree keeps running (see README, "
        "What CRIU cannot checkpoint); have it close or reopen the file",
    ),
    (
        re.compile(r"Can't fork for \d+: File exists|PID \d+ .*already"),
        CriuFailure.PID_IN_USE,
        "a process already holds a PID the checkpoint needs; stop it, or run the workload with "
        "`checkpointer run` (own PID namespace) so restores never compete for host PIDs",
    ),
    (
        re.compile(r"has bad size|bad build-ID|bad mode|size mismatch|was changed"),
        CriuFailure.FILE_CHANGED,
        "a file the process had open changed since the checkpoint (CRIU never saves file "
        "contents); restore the file, or restore an older or newer checkpoint",
    ),
    (
        re.compile(r"In-flight connection"),
        CriuFailure.IN_FLIGHT_CONNECTION,
        "a client connected to a listening socket of the tree and was not yet accepted when "
        "CRIU froze it (a busy server); the dump was tried again and met one every time, the "
        "next checkpoint will most likely succeed",
    ),
    (
        re.compile(r"Connected TCP socket|TCP connection.*(established|locked)"),
        CriuFailure.TCP_ESTABLISHED,
        "the tree has established TCP connections; set criu.tcp_established: true for it",
    ),
    (
        re.compile(r"External socket is used|ext.unix|Can't dump half of stream unix"),
        CriuFailure.EXTERNAL_UNIX_SOCKET,
        "the tree has a unix socket connected outside it; set criu.ext_unix_sk: true or close it",
    ),
    (
        re.compile(r"file locks|Some file locks are hold"),
        CriuFailure.FILE_LOCKS,
        "the tree holds file locks; set criu.file_locks: true for it",
    ),
    (
        re.compile(r"not a session leader|shell.job|Found dangling tty|tty"),
        CriuFailure.TTY,
        "the tree uses a terminal; set criu.shell_job: true, or run it without a terminal",
    ),
    (
        re.compile(r"Address already in use"),
        CriuFailure.ADDRESS_IN_USE,
        "a socket address the checkpoint listens on is taken; stop whatever holds it",
    ),
    (
        re.compile(r"vDSO|vdso"),
        CriuFailure.CRIU_TOO_OLD,
        f"this CRIU does not support the running kernel; {INSTALL_HINT}",
    ),
    (
        re.compile(r"No process with pid|Can't seize|No such process|ESRCH"),
        CriuFailure.PROCESS_GONE,
        "the process is gone; `checkpointer status` shows the workload's state",
    ),
    (
        re.compile(r"Can't create a directory \(-17\)"),
        CriuFailure.PROC_DIR_EXISTS,
        "CRIU could not create its temporary proc.crtools directory in the working directory of "
        "a process of the tree (see /proc/PID/cwd): another CRIU run is dumping a process with "
        "the same working directory, or an interrupted one left the empty directory behind; "
        "remove it when no CRIU is running",
    ),
    (
        re.compile(r"can't dump unprivileged task|Can't create a directory \(-13\)"),
        CriuFailure.SWITCHED_USER,
        "the tree's first process switched to another user, and CRIU needs it to be root (it "
        "mounts the /proc of the tree's PID namespace from inside it); start the program under "
        "the service's init, which stays root: `checkpointer run NAME -- checkpointer-init "
        "COMMAND...`",
    ),
    (
        re.compile(r"Can't get rlimit"),
        CriuFailure.NEEDS_CAP_SYS_RESOURCE,
        "CRIU reads the resource limits of every process, which for a process of another user "
        "needs CAP_SYS_RESOURCE; run the daemon with every capability",
    ),
    (
        re.compile(r"Operation not permitted|Permission denied|EPERM"),
        CriuFailure.PERMISSION,
        "CRIU needs root with all capabilities; run the daemon as root",
    ),
]


def classify(log_text: str) -> tuple[CriuFailure, str, str]:
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
    return CriuFailure.UNKNOWN, first, "read the CRIU log for the cause"
