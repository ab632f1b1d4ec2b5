"""Launcher run as a separate program: `python launch.py STATUS_FD CMD ARGS...`.

It unshares a PID namespace and forks once: the child becomes PID 1 of the new namespace,
calls setsid() *inside* it (CRIU refuses a session leader outside the tree's namespace) and
execs CMD. The launcher writes `ok PID` (the child's host PID) or `error MESSAGE` to STATUS_FD
and exits at once, so the tree's root is re-parented to the daemon, which is a child subreaper:
after a restore, the restored root is the daemon's child in exactly the same way.
No parent-death signal is set: CRIU would restore it and it would fire when CRIU exits.
Kept free of imports from the package, so it starts fast.
"""

import ctypes
import os
import sys

CLONE_NEWPID = 0x20000000


def main() -> None:
    status_fd = int(sys.argv[1])
    argv = sys.argv[2:]
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
            os.execvp(argv[0], argv)
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
