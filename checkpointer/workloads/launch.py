"""Launcher run as a separate program: `python launch.py STATUS_FD CMD ARGS...`.

It unshares a PID namespace and forks once: the child becomes PID 1 of the new namespace,
calls setsid() *inside* it (CRIU refuses a session leader outside the tree's namespace) and
execs CMD. The launcher writes `ok PID` (the child's host PID) or `error MESSAGE` to STATUS_FD
and exits at once, so the tree's root is re-parented to the daemon, which is a child subreaper:
after a restore, the restored root is the daemon's child in exactly the same way.
No parent-death signal is set: CRIU would restore it and it would fire when CRIU exits.
A command that starts with `checkpointer-init` gets the service's init (init.py) as PID 1 and
runs as its child: for programs that switch to another user (see init.py for why).
Kept free of imports from the package, so it starts fast.
"""

import ctypes
import os
import signal
import sys

CLONE_NEWPID = 0x20000000
INIT_COMMAND = "checkpointer-init"
"""The first word of a managed command that asks for the service's init (no PATH lookup)."""
_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init.py")


def start(argv: list[str], err_w: int) -> None:
    """In PID 1 of the new namespace: exec the command, or the init that will run it."""
    if argv[0] == INIT_COMMAND:
        os.set_inheritable(err_w, True)  # the init hands it to the command (init.py)
        os.execv(sys.executable, [sys.executable, "-I", "-S", _INIT, str(err_w), *argv[1:]])
    # Python ignores these at start, and an ignored signal stays ignored across exec.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.execvp(argv[0], argv)


def main() -> None:
    status_fd = int(sys.argv[1])
    argv = sys.argv[2:]
    if argv[0] == INIT_COMMAND and len(argv) == 1:
        os.write(status_fd, f"error {INIT_COMMAND} needs the command to run after it".encode())
        os._exit(1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        os.write(status_fd, f"error cannot create a PID namespace: {os.strerror(err)}".encode())
        os._exit(1)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        os.close(status_fd)
        try:
            os.setsid()
            start(argv, err_w)
        except OSError as e:
            os.write(err_w, f"cannot start {argv[0]!r}: {e.strerror}".encode())
        os._exit(127)
    os.close(err_w)
    # EOF here means exec succeeded (the pipe is close-on-exec); text means it failed.
    failure = b""
    while chunk := os.read(err_r, 4096):
        failure += chunk
    if failure:
        os.write(status_fd, b"error " + failure)
        os._exit(1)
    os.write(status_fd, f"ok {pid}".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
