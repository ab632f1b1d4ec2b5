"""The daemon's side of a lazy restore's guard (the guard itself: checkpointer.criu.lazy.guard).

The guard is a process of its own that starts `criu lazy-pages` as its child (so that nothing
the daemon started for the restore outlives both: the daemon's death reaches the guard as EOF
on its stdin at any moment), holds the page server's connection and copies of the
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
import select
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import checkpointer
from checkpointer.criu.lazy.uffd_hold import pidfd_getfd
from checkpointer.host import children

# The guard's entry point, and the folder that holds the checkpointer package (a checkout or
# site-packages): given as an argument, never spliced into the code.
_GUARD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from checkpointer.criu.lazy.guard import main; sys.exit(main())"
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
    """One running guard of a lazy restore, the parent of its `criu lazy-pages`, and holding
    `connection` (the page server's end) too. `hook`: for `--action-script`."""

    def __init__(
        self, lazy_pages: Sequence[str], give: Sequence[int], stderr: int, connection: int
    ) -> None:
        """Start the guard, which starts `lazy_pages` (a command line) with the descriptors
        `give` (at the same numbers) and `stderr`. Without site (-S) and with nothing but the
        standard library to import, it starts in ~30 ms of CPU, not the ~110 of `-m` through
        the package: it starts while CRIU restores, on the same two cores. Isolated (-I:
        neither the working folder nor PYTHON* variables on its path), as it runs as root:
        only the standard library and our own package are imported."""
        fds: list[int] = []
        try:
            requests_r, requests_w = _pipe(fds)
            answers_r, answers_w = _pipe(fds)
            script = _hook_script(_HOOK.format(requests=requests_w, answers=answers_r))
            fds.append(script)
            stdin_r, stdin_w = _pipe(fds)
            reports_r, reports_w = _pipe(fds)
            ours = [requests_r, answers_w, script, connection, stderr]
            argv = [*map(str, ours), ",".join(map(str, give)), *lazy_pages]
            self._proc = children.spawn(
                [sys.executable, "-I", "-S", "-c", _GUARD, _PACKAGE_ROOT, *argv],
                cwd="/",
                stdin=stdin_r,
                stdout=reports_w,
                # The hook opens requests_w and answers_r through /proc: the guard holds them.
                pass_fds=(requests_w, answers_r, *ours, *give),
                start_new_session=True,  # it must outlive us, whatever kills us
            )
            fds.remove(stdin_w)
            fds.remove(reports_r)
        finally:
            for fd in fds:  # the guard's alone: gone with it, so the hook fails without it
                os.close(fd)
        os.set_blocking(reports_r, False)
        self._w = stdin_w
        self._reports = reports_r
        self._buf = b""
        self._reading = threading.Lock()  # the monitor and the page server both ask
        self._lazy_pages: tuple[int, int] | None = None  # its PID and our pidfd of it
        self._lazy_pages_exit: int | None = None
        self.hook = f"/proc/{self._proc.pid}/fd/{script}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def lazy_pages(self, timeout: float) -> tuple[int, int] | None:
        """The PID of `criu lazy-pages` and a pidfd of it (ours: close it), once the guard has
        started it; None if the guard did not within `timeout` (it exited: its stderr, the
        daemon's log, says why)."""
        deadline = time.monotonic() + timeout
        while self._read_reports() and self._lazy_pages is None:
            if time.monotonic() > deadline:
                return None
            select.select([self._reports], [], [], max(0.0, deadline - time.monotonic()))
        return self._lazy_pages

    def lazy_pages_exit(self) -> int | None:
        """The exit status of `criu lazy-pages` as subprocess reports one (-N: killed by
        signal N), once it exited and the guard collected it."""
        self._read_reports()
        return self._lazy_pages_exit

    def _read_reports(self) -> bool:
        """Take the guard's new lines; False once it closed its end (it exited)."""
        with self._reading:
            return self._read_reports_locked()

    def _read_reports_locked(self) -> bool:
        while self._reports >= 0:
            try:
                data = os.read(self._reports, 4096)
            except BlockingIOError:
                return True
            if not data:
                os.close(self._reports)
                self._reports = -1
                break
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                self._take(line.decode(errors="replace").split())
        return False

    def _take(self, words: list[str]) -> None:
        if words[:1] == ["pid"] and len(words) == 3 and self._lazy_pages is None:
            # pidfd_getfd of the guard's own pidfd: the PID cannot have been reused meanwhile.
            with contextlib.suppress(OSError):
                guard = os.pidfd_open(self._proc.pid)
                try:
                    self._lazy_pages = (int(words[1]), pidfd_getfd(guard, int(words[2])))
                finally:
                    os.close(guard)
        elif words[:1] == ["exit"] and len(words) == 2:
            self._lazy_pages_exit = int(words[1])

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
        if children.reap(self._proc, kill=False, timeout=5.0) is None:
            return False
        self._read_reports()  # the exit status of `criu lazy-pages`, if it just came
        return True

    def close(self) -> None:
        """Let go of the report pipe and the pidfd (after `end`)."""
        if self._reports >= 0:
            os.close(self._reports)
            self._reports = -1
        if self._lazy_pages is not None:
            os.close(self._lazy_pages[1])
            self._lazy_pages = None


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
