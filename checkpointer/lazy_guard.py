"""The guard of one lazy restore: a small process that outlives the daemon.

The daemon serves the pages and holds copies of the lazy-pages daemon's userfaultfds, so that
the tree blocks on a page that cannot come instead of reading zeros. If the daemon itself dies
(kill -9, OOM) both go with it: the lazy-pages daemon exits, the last userfaultfd closes, and
the kernel fills every page still missing with zeros under a running tree. The guard holds its
own copies and watches a pipe from the daemon: "done" (every page arrived) lets it go; the
pipe closing without it, or "kill", makes it SIGKILL the tree, and only then let go.

Started by checkpointer.criu.lazy.guard_process with `main()` and LAZY_PAGES_PID as its
argument, the pipe as stdin; it imports the standard library only (see GuardProcess there).
That is why it and uffd_hold sit outside checkpointer.criu: importing anything there runs the
package's __init__, which loads the driver and its imports (measured: 85 ms of CPU to start
instead of 38), while CRIU restores on the same two cores. The tree's root comes later on the
pipe as "root PID START_TIME" (it exists only once CRIU restored it); until then the copies
alone keep the tree from wrong memory.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

from checkpointer.uffd_hold import UffdHold
from checkpointer.workloads.process import descendants, is_alive, start_time

_TICK = 0.05


def _kill_tree(root: int | None, root_start: int | None) -> None:
    if root is None or not is_alive(root, root_start):
        return
    pids = {root: root_start, **{p: start_time(p) for p in descendants(root)}}
    deadline = time.monotonic() + 10
    while any(is_alive(p, t) for p, t in pids.items()) and time.monotonic() < deadline:
        for p, t in pids.items():
            if is_alive(p, t):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        time.sleep(0.01)


def main() -> int:
    hold = UffdHold(int(sys.argv[1]))
    root: int | None = None
    root_start: int | None = None
    buf = b""
    try:
        while True:
            with contextlib.suppress(OSError):
                hold.refresh()
            ready, _, _ = select.select([0], [], [], _TICK)
            if not ready:
                continue
            data = os.read(0, 4096)
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                words = line.split()
                if words[:1] == [b"root"] and len(words) == 3:
                    root = int(words[1])
                    root_start = int(words[2]) if words[2].isdigit() else None
                elif words == [b"done"]:
                    return 0
                elif words == [b"kill"]:
                    _kill_tree(root, root_start)
                    return 0
            if not data:  # the daemon is gone and its pages with it
                _kill_tree(root, root_start)
                # Its stderr is the daemon's log: the operator reads there why the tree died.
                print(
                    f"lazy restore guard: the daemon died with pages still missing; "
                    f"killed the restored tree (pid {root})",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
    finally:
        hold.release()


if __name__ == "__main__":
    sys.exit(main())
