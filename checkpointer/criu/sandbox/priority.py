"""The priority of a restore drill's work, so the live workloads do not feel it: the sandbox's
CRIU restore and the daemon's threads that read and verify the image.

Measured with bench/drill.py (2-core VM, 100 MB counter, a client asking it all along; each
way of drilling in one interleaved run, against two windows of nothing: their p99s differ by
x0.90 to x1.04). The live counter's p99 during drills, over its p99 without (6 runs, load 2.6
to 12): the sandbox at nice 19 x1.18 to x1.51 (x1.28 and x1.55 in the two runs before these),
SCHED_IDLE with the idle I/O class x1.52 to x1.65, SCHED_IDLE in a cgroup with a CPU quota
(cgroup.py) x1.09 to x1.81. Nice 19 did better than SCHED_IDLE in every run that had both, so
it is the default again. None stays within the noise: what moves the workload's p99 is not
the drill's CPU share. Work at SCHED_IDLE or nice 10 alone (a CPU loop, 230 MB mapped,
touched and unmapped, 115 MB copies, namespaces made and dropped in a loop) left the p99
where it was (x0.51 to x0.92); a guess not yet measured: what only a drill does (an overlay
over every mount of the host, CRIU's restore, the daemon's writes at the end).

The daemon's own drilling thread is niced, never SCHED_IDLE: it holds the workload's lock while
it rebuilds the image and, as every Python thread, the interpreter's lock while it hashes and
decrypts. A SCHED_IDLE holder on a busy host may not run for seconds, and a crash restore of
the workload (its lock) or the fleet's heartbeat (the interpreter's) would wait for it: a
priority inversion. Nice 10 still runs (a tenth of a nice-0 task's share), and the
best-effort class's lowest I/O level is never starved the way the idle class can be; the
sandbox, forked from that thread, inherits that I/O level (and goes on to nice 19). Measured
too and dropped: that thread SCHED_IDLE, or kept off the CPUs the live tree last ran on (no
lower p99).

`DRILL_PRIORITY` (environment: CHECKPOINTER_DRILL_PRIORITY, a comma-separated list) chooses
what a drill does, for bench/drill.py to measure the choices side by side in one run:
`nice` (the default: the sandbox at nice 19) or `idle` (SCHED_IDLE and the idle I/O class);
`shm`, the image rebuilt on tmpfs when it fits, as a dump's (no difference measured);
`throttle`, the sandbox in a cgroup with a CPU quota (cgroup.py; the drill takes 2 to 3 times
longer).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

NICE = 10  # the drilling thread's
SANDBOX_NICE = 19
IDLE, NICED, SHM, THROTTLE = "idle", "nice", "shm", "throttle"
DEFAULT = NICED
DRILL_PRIORITY = frozenset(os.environ.get("CHECKPOINTER_DRILL_PRIORITY", DEFAULT).split(","))
_IOPRIO_WHO_PROCESS, _IOPRIO_CLASS_BE, _IOPRIO_CLASS_SHIFT = 1, 2, 13
_IOPRIO_BE_LOWEST = 7
_SYS_IOPRIO_SET, _SYS_IOPRIO_GET = 251, 252  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def argv() -> list[str]:
    """The commands a sandbox is started through (each sets its priority, then execs the
    next; CRIU and everything it starts inherit it): nice 19 (the most `nice` adds up to,
    from the drilling thread's 10); with `idle`, ionice's idle class, then SCHED_IDLE."""
    if IDLE in DRILL_PRIORITY:
        return ["ionice", "-c", "3", "chrt", "--idle", "0"]
    return ["nice", "-n", str(SANDBOX_NICE)]


@contextlib.contextmanager
def this_thread() -> Iterator[None]:
    """This thread, and the threads it starts meanwhile (the image's pack readers inherit
    it), at nice 10 and the lowest best-effort I/O level (not SCHED_IDLE: see the module's
    docstring); back to what it was afterwards. Per thread: the rest of the daemon (API,
    scheduler, the fleet's heartbeats) keeps its priority."""
    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    io = _libc.syscall(_SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS, tid)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, NICE))
        _set_io(tid, _IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT | _IOPRIO_BE_LOWEST)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # raising it back needs CAP_SYS_NICE: root has it
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            if io >= 0:
                _set_io(tid, io)


def _set_io(tid: int, ioprio: int) -> None:
    if _libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, ioprio) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
