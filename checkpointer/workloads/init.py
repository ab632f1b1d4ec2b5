"""checkpointer-init: PID 1 of a managed workload's namespace that stays root, for programs
that switch to another user (memcached -u, nginx's workers, PostgreSQL, most packaged daemons).

Why: CRIU injects a parasite into the first process of the tree and asks it for a /proc of the
tree's PID namespace (criu/cr-dump.c, root item only). A managed tree sees the host's /proc,
so the parasite mounts one itself, on proc.crtools in the process's working directory, which
only root can do: a first process that switched to another user makes every dump fail ("can't
dump unprivileged task whose /proc doesn't belong to it", or first "Can't create a directory
(-13)" in a folder only root may write). Under this init the first process stays root and the
program, its child, switches freely. A mount namespace with a /proc of its own was tried and
rejected: CRIU then records every host mount in the image (a restore fails once one of them is
gone) and the log FIFO handed to a restored tree lives outside its namespace (the next dump
fails: "Can't lookup mount").

What it does, as tini and catatonit do: runs the command as its child, passes on the signals a
person or a supervisor sends to PID 1 (HUP, INT, QUIT, TERM, USR1, USR2, WINCH), reaps every
orphan of the namespace, and exits with the command's status when the command exits (128+N
when signal N killed it: PID 1 of a namespace cannot die of a signal it sends itself), which
ends the namespace as the command's own exit would have.

Started by launch.py as `python -I -S init.py ERR_FD CMD ARGS...`: ERR_FD is the launcher's
pipe, closed when CMD was exec'd, or given the reason it could not be. Kept free of imports
from the package: it starts fast and adds about 3.5 MB of anonymous memory to each checkpoint.
"""

import os
import signal
import sys

FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# Python ignores these at start, and an ignored signal stays ignored across exec: the command
# gets the dispositions it would get from a shell.
RESET = (signal.SIGPIPE, signal.SIGXFSZ)


def exec_command(argv: list[str], err_fd: int) -> None:
    """In the child: become `argv`, or write why not on `err_fd` and exit 127."""
    for sig in RESET:
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(err_fd, f"cannot start {argv[0]!r}: {e.strerror}".encode())
    os._exit(127)


def main() -> None:
    err_fd = int(sys.argv[1])
    argv = sys.argv[2:]
    os.set_inheritable(err_fd, False)  # closes on the command's exec: the launcher sees EOF
    child = os.fork()
    if child == 0:
        exec_command(argv, err_fd)
    os.close(err_fd)

    def forward(signum: int, _frame: object) -> None:
        # Not contextlib.suppress: its imports would add memory to every checkpoint.
        try:  # noqa: SIM105
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)  # not reached: the command is our child until we reap it
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
