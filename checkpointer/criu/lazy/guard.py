"""The guard of one lazy restore: a small process that outlives the daemon.

The daemon serves the pages and holds copies of the lazy-pages daemon's userfaultfds, so that
the tree blocks on a page that cannot come instead of reading zeros. If the daemon itself dies
(kill -9, OOM) both go with it: `criu lazy-pages` sees the page server's connection close and
exits, the last userfaultfd closes, and the kernel fills every page still missing with zeros
under a running tree. So the guard:
- starts `criu lazy-pages` itself, as its child: whenever the daemon dies, from the moment
  it asked for a lazy restore, the guard is there to end it (started by the daemon, a
  `criu lazy-pages` was left waiting forever when the daemon died before the guard started);
  it reports its PID and exit status to the daemon on its stdout;
- holds the page server's connection too (a copy of the daemon's end): the daemon's death
  does not close it, and `criu lazy-pages` keeps waiting for its answers with every
  userfaultfd of the tree open, forks made during the transfer included, whatever their
  number; and copies of those userfaultfds (UffdHold), in case `criu lazy-pages` dies itself;
- knows the tree before it runs: `criu restore` runs a hook (guard_process) as its
  post-restore action script, when every process of the tree exists but none has resumed; the
  hook hands the guard the root's PID on a pipe (the guard takes its pidfd) and fails unless
  the guard answers "ok", and a failed hook makes CRIU kill the tree. A guard that is gone
  cannot answer; one that lost the daemon before is gone;
- confines a tree in the host's PID namespace to a cgroup of its own at the hook, before it
  runs: no process of it can leave its reach by daemonizing (checkpointer.criu.lazy.tree_cgroup);
- follows the tree (checkpointer.criu.lazy.restored_tree) until the daemon says "done" (every page
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
GUARD_NAME = "ckpt-lazy-guard"  # its /proc/PID/comm (what the daemon's start-up sweep looks for)
_PR_SET_NAME = 15


class _Guard:
    """One lazy restore's guard: what it holds, and the tree once the hook named it."""

    def __init__(self, lazy_pages_pid: int, hook_in: int, hook_out: int, connection: int) -> None:
        from checkpointer.criu.lazy.restored_tree import RestoredTree
        from checkpointer.criu.lazy.uffd_hold import UffdHold

        self.lazy_pages_pid = lazy_pages_pid
        self.lazy_pages = os.pidfd_open(lazy_pages_pid)  # our child: never a reused PID
        self.reaped = False
        # Its PID and our pidfd's number (the daemon copies it with pidfd_getfd: race-free).
        _report(f"pid {lazy_pages_pid} {self.lazy_pages}")
        self.hold = UffdHold(lazy_pages_pid)
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
                watched = [0, self.hook_in] + ([] if self.reaped else [self.lazy_pages])
                ready, _, _ = select.select(watched, [], [], _TICK)
                if self.lazy_pages in ready:
                    self._reap_lazy_pages()
                if self.hook_in in ready:
                    self._answer_hook()
                if 0 not in ready:
                    continue
                data = os.read(0, 4096)
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line == b"done":
                        self._let_go()
                        return 0
                    if line == b"kill":
                        self._kill_tree()
                        return 0
                if not data:  # the daemon is gone and its pages with it
                    return self._daemon_died()
        finally:
            self.hold.release()
            os.close(self.connection)
            if not self.reaped:  # it never outlives us (the tree is dead or owns its memory)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.lazy_pages, signal.SIGKILL)
                self._reap_lazy_pages()

    def _reap_lazy_pages(self) -> None:
        """Collect `criu lazy-pages` once it exited, and tell the daemon its exit status."""
        _, status = os.waitpid(self.lazy_pages_pid, 0)
        self.reaped = True
        _report(f"exit {os.waitstatus_to_exitcode(status)}")

    def _answer_hook(self) -> None:
        """The hook wrote "root PID" (one write, under PIPE_BUF: whole): take the root's
        pidfd and the userfaultfds there are, then answer; the tree resumes on "ok" only."""
        words = os.read(self.hook_in, 64).split()
        answer = b"no: not understood"
        if len(words) == 2 and words[0] == b"root" and words[1].isdigit():
            try:
                self.tree.adopt(int(words[1]))
                self._confine()
                answer = b"ok"
            except ProcessLookupError:
                answer = b"no: the tree is gone"
            with contextlib.suppress(OSError):
                self.hold.refresh()
        os.write(self.hook_out, answer + b"\n")

    def _confine(self) -> None:
        """The tree in a cgroup of its own; without one (no cgroup v2 here), followed only."""
        try:
            self.tree.confine(str(os.getpid()))
        except ProcessLookupError:
            raise
        except OSError as e:
            print(
                f"lazy restore guard: cannot put tree {self.tree.pid} in a cgroup of its own "
                f"({e}); a process of it that daemonizes during the transfer may escape a kill",
                file=sys.stderr,
                flush=True,
            )

    def _let_go(self) -> None:
        if not self.tree.let_go():
            print(
                f"lazy restore guard: could not move tree {self.tree.pid} back from its cgroup",
                file=sys.stderr,
                flush=True,
            )
        self.tree.close()

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
                self.tree.close()
                return
            if not warned and time.monotonic() - started > 10:
                print(
                    f"lazy restore guard: tree {self.tree.pid} does not die; holding its pages",
                    file=sys.stderr,
                    flush=True,
                )
                warned = True
            time.sleep(0.01 if not warned else 0.5)


def _report(line: str) -> None:
    """One line to the daemon (our stdout is its pipe); quiet if it is gone."""
    with contextlib.suppress(OSError):
        os.write(1, line.encode() + b"\n")


def _spawn_lazy_pages(argv: list[str], give: list[int], stderr: int, keep: list[int]) -> int:
    """Start `criu lazy-pages` (`argv`) in a session of its own, with the descriptors `give`
    at the same numbers, `stderr` as its stderr, and none of ours (`keep`) nor our
    stdin/stdout; its PID. `give` and `stderr` are closed here: they are its alone (the
    page server must see EOF when it dies)."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
        *((os.POSIX_SPAWN_CLOSE, fd) for fd in [stderr, *keep]),
    ]
    try:
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsid=True)
    finally:
        for fd in [*give, stderr]:
            os.close(fd)


def main() -> int:
    """argv: the fds of the hook's pipes (read the requests, write the answers), the hook
    script's, the page server connection's, the stderr for `criu lazy-pages`, the fds it is
    given (comma-separated), then its command line. stdin: the daemon's pipe; stdout: the
    reports to the daemon."""
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_NAME, GUARD_NAME.encode(), 0, 0, 0)
    hook_in, hook_out, script, connection, stderr = (int(a) for a in sys.argv[1:6])
    give = [int(a) for a in sys.argv[6].split(",") if a]
    keep = [hook_in, hook_out, script, connection]
    for fd in keep:
        os.set_inheritable(fd, False)
    lazy_pages_pid = _spawn_lazy_pages(sys.argv[7:], give, stderr, keep)
    return _Guard(lazy_pages_pid, hook_in, hook_out, connection).run()


if __name__ == "__main__":
    sys.exit(main())
