"""The guard of one lazy restore: a small process that outlives the daemon.

The daemon serves the pages and holds copies of the lazy-pages daemon's userfaultfds, so that
the tree blocks on a page that cannot come instead of reading zeros. If the daemon itself dies
(kill -9, OOM) both go with it: `criu lazy-pages` sees the page server's connection close and
exits, the last userfaultfd closes, and the kernel fills every page still missing with zeros
under a running tree. So the guard:
- holds the page server's connection too (a copy of the daemon's end): the daemon's death
  does not close it, and `criu lazy-pages` keeps waiting for its answers with every
  userfaultfd of the tree open, forks made during the transfer included, whatever their
  number; and copies of those userfaultfds (UffdHold), in case `criu lazy-pages` dies itself;
- knows the tree before it runs: `criu restore` runs a hook (guard_process) as its
  post-restore action script, when every process of the tree exists but none has resumed; the
  hook hands the guard the root's PID on a pipe (the guard takes its pidfd) and fails unless
  the guard answers "ok", and a failed hook makes CRIU kill the tree. A guard that is gone
  cannot answer; one that lost the daemon before is gone;
- follows the tree (checkpointer.restored_tree) until the daemon says "done" (every page
  arrived: let go) or "kill" on its pipe; the pipe closing without either means the daemon
  died: it kills the tree, and lets go of the connection and the copies only once nothing of
  the tree runs.

Started by checkpointer.criu.lazy.guard_process with `main()`. It imports as little as it can:
it starts while CRIU restores on the same two cores. That is also why this module and the two
it uses sit outside checkpointer.criu: importing anything there runs the package's __init__,
which loads the driver and its imports (measured: 85 ms of CPU to start instead of 38).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

_TICK = 0.05


class _Guard:
    """One lazy restore's guard: what it holds, and the tree once the hook named it."""

    def __init__(self, lazy_pages_pid: int, hook_in: int, hook_out: int, connection: int) -> None:
        from checkpointer.restored_tree import RestoredTree
        from checkpointer.uffd_hold import UffdHold

        self.hold = UffdHold(lazy_pages_pid)
        self.lazy_pages = os.pidfd_open(lazy_pages_pid)
        self.hook_in, self.hook_out = hook_in, hook_out
        self.connection = connection
        self.tree = RestoredTree()

    def run(self) -> int:
        buf = b""
        try:
            while True:
                with contextlib.suppress(OSError):
                    self.hold.refresh()
                self.tree.follow()
                ready, _, _ = select.select([0, self.hook_in], [], [], _TICK)
                if self.hook_in in ready:
                    self._answer_hook()
                if 0 not in ready:
                    continue
                data = os.read(0, 4096)
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line == b"done":
                        return 0
                    if line == b"kill":
                        self._kill_tree()
                        return 0
                if not data:  # the daemon is gone and its pages with it
                    return self._daemon_died()
        finally:
            self.hold.release()
            os.close(self.connection)

    def _answer_hook(self) -> None:
        """The hook wrote "root PID" (one write, under PIPE_BUF: whole): take the root's
        pidfd and the userfaultfds there are, then answer; the tree resumes on "ok" only."""
        words = os.read(self.hook_in, 64).split()
        answer = b"no: not understood"
        if len(words) == 2 and words[0] == b"root" and words[1].isdigit():
            try:
                self.tree.adopt(int(words[1]))
                answer = b"ok"
            except ProcessLookupError:
                answer = b"no: the tree is gone"
            with contextlib.suppress(OSError):
                self.hold.refresh()
        os.write(self.hook_out, answer + b"\n")

    def _daemon_died(self) -> int:
        # Its stderr is the daemon's log: the operator reads there why the tree died.
        if self.tree.pid is None:
            # Before the hook: without this process the hook fails and CRIU kills the tree.
            print(
                "lazy restore guard: the daemon died during the restore; CRIU aborts it",
                file=sys.stderr,
                flush=True,
            )
        else:
            self._kill_tree()
            print(
                "lazy restore guard: the daemon died with pages still missing; "
                f"killed the restored tree (pid {self.tree.pid})",
                file=sys.stderr,
                flush=True,
            )
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.lazy_pages, signal.SIGKILL)
        return 1

    def _kill_tree(self) -> None:
        """Kill the tree until nothing of it runs; never give up (the copies are let go only
        after this returns: a process left running would then read zeros)."""
        started = time.monotonic()
        warned = False
        while True:
            self.tree.kill()
            if self.tree.dead():
                return
            if not warned and time.monotonic() - started > 10:
                print(
                    f"lazy restore guard: tree {self.tree.pid} does not die; holding its pages",
                    file=sys.stderr,
                    flush=True,
                )
                warned = True
            time.sleep(0.01 if not warned else 0.5)


def main() -> int:
    """argv: the `criu lazy-pages` PID, the fds of the hook's pipes (read the requests, write
    the answers), the page server connection's fd; stdin: the daemon's pipe."""
    lazy_pages_pid, hook_in, hook_out, connection = (int(a) for a in sys.argv[1:5])
    return _Guard(lazy_pages_pid, hook_in, hook_out, connection).run()


if __name__ == "__main__":
    sys.exit(main())
