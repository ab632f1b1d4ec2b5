"""The daemon's side of a lazy restore's guard (the guard itself: checkpointer.lazy_guard).

The guard is a process of its own that holds the page server's connection and copies of the
userfaultfds too, learns the restored root from CRIU's post-restore hook before the tree runs,
and kills the tree if the daemon dies before the pages are all there. It is told on a pipe:
"done" when the tree owns all its memory, "kill" when the restore failed.

The hook is a shell script in a memfd the guard holds, given to `criu restore` as
`--action-script /proc/GUARD/fd/N`: it needs no executable file on disk (/dev/shm, where the
restore folder usually is, is mounted noexec on hardened hosts), and it exists only as long as
the guard does. It reaches the guard through two pipes the guard holds, opened by the same
/proc/GUARD/fd path: gone with the guard, so a restore whose guard is gone cannot hand it the
tree and is aborted by CRIU, which kills the tree. A shell script and pipes, not Python and a
socket: CRIU waits for the hook with the tree stopped, and Python's start (about 20 ms of CPU,
over 100 ms under load here) doubled the time a lazy restore took to return.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import checkpointer
from checkpointer import children

# The guard's entry point, and the folder that holds the checkpointer package (a checkout or
# site-packages): given as an argument, never spliced into the code.
_GUARD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from checkpointer.lazy_guard import main; sys.exit(main())"
)
_PACKAGE_ROOT = str(Path(checkpointer.__file__).resolve().parent.parent)
_MFD_EXEC = 0x10  # Linux 6.3+: say that the memfd is meant to be executed

# CRIU runs its action scripts at every step of a restore; post-restore is the hook's. $0 is
# /proc/GUARD/fd/N: the pipes are the guard's descriptors beside it (REQUESTS, ANSWERS).
_HOOK = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] || exit 0
fds=${{0%/*}}
echo "root $CRTOOLS_INIT_PID" > "$fds/{requests}" && read -r answer < "$fds/{answers}" &&
  [ "$answer" = ok ] && exit 0
echo "lazy restore hook: the guard did not take tree $CRTOOLS_INIT_PID (${{answer:-gone}})" >&2
exit 1
"""


class GuardProcess:
    """One running guard of a lazy restore, watching `criu lazy-pages` (`lazy_pages_pid`)
    and holding `connection` (the page server's end) too. `hook`: for `--action-script`."""

    def __init__(self, lazy_pages_pid: int, connection: int) -> None:
        """Start the guard. Without site (-S) and with nothing but the standard library to
        import, it starts in ~30 ms of CPU, not the ~110 of `-m` through the package: it
        starts while CRIU restores, on the same two cores. Isolated (-I: neither the working
        folder nor PYTHON* variables on its path), as it runs as root: only the standard
        library and our own package are imported."""
        fds: list[int] = []
        try:
            requests_r, requests_w = _pipe(fds)
            answers_r, answers_w = _pipe(fds)
            script = _hook_script(_HOOK.format(requests=requests_w, answers=answers_r))
            fds.append(script)
            stdin_r, stdin_w = _pipe(fds)
            argv = [str(lazy_pages_pid), str(requests_r), str(answers_w), str(connection)]
            self._proc = children.spawn(
                [sys.executable, "-I", "-S", "-c", _GUARD, _PACKAGE_ROOT, *argv],
                cwd="/",
                stdin=stdin_r,
                stdout=subprocess.DEVNULL,
                # The hook opens requests_w and answers_r through /proc: the guard holds them.
                pass_fds=(requests_r, requests_w, answers_r, answers_w, script, connection),
                start_new_session=True,  # it must outlive us, whatever kills us
            )
            fds.remove(stdin_w)
        finally:
            for fd in fds:  # the guard's alone: gone with it, so the hook fails without it
                os.close(fd)
        self._w = stdin_w
        self.hook = f"/proc/{self._proc.pid}/fd/{script}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exited(self) -> int | None:
        """Its exit status if it has exited (it should not before `end`: the daemon watches)."""
        return self._proc.poll()

    def tell(self, what: str) -> None:
        """One line to the guard; quiet if it is gone (its own exit says what it did)."""
        if self._w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._w, what.encode() + b"\n")

    def end(self, kill: bool = False) -> bool:
        """The tree owns its memory ("done"), or must die first (`kill`): the guard lets go
        and exits. False if it did not exit within 5 s."""
        if self._w >= 0:
            self.tell("kill" if kill else "done")
            os.close(self._w)
            self._w = -1
        return children.reap(self._proc, kill=False, timeout=5.0) is not None


def _pipe(fds: list[int]) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    fds += [r, w]
    return r, w


def _hook_script(text: str) -> int:
    """A read-only descriptor of an executable memfd holding `text`."""
    try:
        fd = os.memfd_create("checkpointer-lazy-hook", os.MFD_CLOEXEC | _MFD_EXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel before 6.3, where memfds all execute
            raise OSError(
                e.errno,
                f"cannot make the lazy restore's hook executable ({e.strerror}; "
                "vm.memfd_noexec must be 0 or 1 for lazy restores, or set restore.lazy off)",
            ) from e
        fd = os.memfd_create("checkpointer-lazy-hook", os.MFD_CLOEXEC)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o500)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
