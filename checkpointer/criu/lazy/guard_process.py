"""The daemon's side of a lazy restore's guard (the guard itself: checkpointer.lazy_guard).

The guard is a process of its own that holds copies of the userfaultfds too, and kills the
tree if the daemon dies before the pages are all there. It is told what happens on a pipe:
"root PID START_TIME" once CRIU restored the tree, "done" when it owns all its memory.
"""

from __future__ import annotations

import contextlib
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


class GuardProcess:
    """One running guard, watching the `criu lazy-pages` process `daemon_pid`."""

    def __init__(self, daemon_pid: int) -> None:
        """Start the guard. Without site (-S) and with nothing but the standard library to
        import, it starts in ~30 ms of CPU, not the ~110 of `-m` through the package: it
        starts while CRIU restores, on the same two cores. Isolated (-I: neither the working
        folder nor PYTHON* variables on its path), as it runs as root: only the standard
        library and our own package are imported."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            self._proc = children.spawn(
                [sys.executable, "-I", "-S", "-c", _GUARD, _PACKAGE_ROOT, str(daemon_pid)],
                cwd="/",
                stdin=r,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # it must outlive us, whatever kills us
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._w = w

    def tell(self, what: str) -> None:
        """One line to the guard; quiet if it is gone (its own exit says what it did)."""
        if self._w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._w, what.encode() + b"\n")

    def end(self) -> bool:
        """The tree owns its memory, or is dead: the guard may let go. False if it did not
        exit within 5 s."""
        if self._w >= 0:
            self.tell("done")
            os.close(self._w)
            self._w = -1
        return children.reap(self._proc, kill=False, timeout=5.0) is not None
