"""The lowest CPU and I/O priority for a restore drill's work, so the live workloads do not
feel it: the sandbox's CRIU restore and the daemon's threads that read and verify the image.

Measured with bench/drill.py on a 2-core host (100 MB counter): at nice 10, the live counter's
p99 went from 7.2 to 15.5 ms during drills (x2.16). Nice only shrinks a share of the CPU
(nice 10 still weighs 110 against a nice-0 task's 1024); SCHED_IDLE (weight 3, and never
preempting a normal task) and the idle I/O class (served only when no one else waits for the
disk) are the kernel's "only when nothing else wants it". The cost: on a host busy with other
work a drill takes longer; it holds no lock of the workload then but while the image is read.

The daemon's own drilling thread is niced, never SCHED_IDLE: it holds the workload's lock while
it rebuilds the image and, as every Python thread, the interpreter's lock while it hashes and
decrypts. A SCHED_IDLE holder on a busy host may not run for seconds, and a crash restore of
the workload (its lock) or the fleet's heartbeat (the interpreter's) would wait for it: a
priority inversion. Nice 10 still runs (a tenth of a nice-0 task's share), and the
best-effort class's lowest I/O level is never starved the way the idle class can be. Only the
sandbox, a process of its own that holds nothing of the daemon's, gets SCHED_IDLE and idle I/O.

The same holds for the rebuilding thread measured: SCHED_IDLE for it, or keeping it off the
CPUs the live tree last ran on, did not lower the live p99 during the rebuild (x1.5 to x2.1
in every variant, bench/drill.py): what the rebuild costs the workload is not a matter of its
priority (see cgroup.py for what was).

`DRILL_PRIORITY` (environment: CHECKPOINTER_DRILL_PRIORITY, a comma-separated list) chooses
what a drill does, for bench/drill.py to measure the choices side by side in one run. The
default, `idle,shm,throttle`: the sandbox SCHED_IDLE and idle I/O (`idle`; `nice` instead is
the earlier nice-10 sandbox), the image rebuilt on tmpfs when it fits (`shm`, as a dump's:
no disk writes and no writeback by the kernel's threads at their normal priority), the
sandbox in a cgroup with a CPU quota (`throttle`, cgroup.py). `idle` alone is the drill as it
was before the quota.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

NICE = 10
IDLE, NICED, SHM, THROTTLE = "idle", "nice", "shm", "throttle"
DEFAULT = f"{IDLE},{SHM},{THROTTLE}"
DRILL_PRIORITY = frozenset(os.environ.get("CHECKPOINTER_DRILL_PRIORITY", DEFAULT).split(","))
_IOPRIO_WHO_PROCESS, _IOPRIO_CLASS_BE, _IOPRIO_CLASS_SHIFT = 1, 2, 13
_IOPRIO_BE_LOWEST = 7
_SYS_IOPRIO_SET, _SYS_IOPRIO_GET = 251, 252  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def argv() -> list[str]:
    """The commands a sandbox is started through (each sets its priority, then execs the
    next; CRIU and everything it starts inherit it): ionice's idle class, then SCHED_IDLE."""
    if NICED in DRILL_PRIORITY:
        return ["nice", "-n", str(NICE)]
    return ["ionice", "-c", "3", "chrt", "--idle", "0"]


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
