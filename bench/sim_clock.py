"""Virtual time for the fleet simulation (bench.fleet_scale): one clock, one event loop, one
thread, no real sleeping.

The model. Every host runs a few pools of workers (lanes), as the daemon runs threads: the
lease scan, the watchdog, its renewal pool, the call watcher, the scheduler's pool. A task (one
call of the real code: a scan tick, a renewal, a checkpoint) waits for a free worker of its
lane, then runs whole, synchronously, when the loop reaches its start time; each request it
sends moves its own time on by the request's latency, so a task takes the sum of its serial
requests' latencies, and `clock()`/`monotonic()` called inside it see that time. Tasks start in
the order of their virtual start times; a task that runs long (a scan of every lease) sees the
store as it was when it started, and other tasks see its writes from then on: the price of not
interleaving real code at each request (that needs one thread per worker).

Storage code reads the time through the clock it is given (storage/clock.py: the
repository, its commits, dedup index and GC; the retrying layer's backoff `sleep`): a host
of the simulation passes this clock in (`storage_clock`, `VirtualClock.spend`), so a
throttled request's retries cost virtual time, not real time, and nothing is patched.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from storage.clock import Clock

EPOCH = 1_800_000_000.0  # the virtual wall clock at time 0 (2027-01-15)


class HostKilled(BaseException):
    """The host was killed: the task it was running stops at its next request (a
    BaseException, so that the daemon's `except Exception` handlers let it through)."""


@dataclass
class Task:
    """The task that runs: whose it is, what it does, and its own time."""

    host: str
    activity: str
    t: float


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0  # the loop's time: when the event being handled fires
        self.current: Task | None = None
        self._lock = threading.Lock()  # a commit's pack writers send requests from threads

    def monotonic(self) -> float:
        task = self.current
        return task.t if task is not None else self.now

    def wall(self) -> float:
        return EPOCH + self.monotonic()

    def spend(self, seconds: float) -> float:
        """The running task waits `seconds` (a request, a backoff); its time after that."""
        with self._lock:
            task = self.current
            if task is None:
                raise RuntimeError("a request outside any task: the harness missed a lane")
            task.t += seconds
            return task.t

    @contextlib.contextmanager
    def task(self, host: str, activity: str, start: float) -> Iterator[Task]:
        if self.current is not None:
            raise RuntimeError("tasks do not nest: submit to a lane instead")
        self.current = Task(host, activity, start)
        try:
            yield self.current
        finally:
            self.current = None


class EventLoop:
    """Callbacks at virtual times, run in order of time (then of scheduling)."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def run(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn = heapq.heappop(self._heap)
            self.clock.now = t
            fn()
        self.clock.now = until


class Lane:
    """A pool of `slots` workers of one host (a thread pool of the daemon)."""

    def __init__(
        self,
        loop: EventLoop,
        host: str,
        activity: str,
        slots: int,
        alive: Callable[[], bool],
    ) -> None:
        self.loop = loop
        self.host = host
        self.activity = activity
        self.free = [0.0] * slots  # when each worker is free again
        self.alive = alive
        self.busy = 0.0  # virtual seconds spent in tasks

    def submit(
        self,
        fn: Callable[[], Any],
        at: float | None = None,
        then: Callable[[float], None] | None = None,
    ) -> None:
        """Run `fn` as a task at `at` (default: now, in the submitting task's time), or when
        a worker is free; `then(end)` after it, outside the task."""
        start = self.loop.clock.monotonic() if at is None else at
        self.loop.at(start, functools.partial(self._start, fn, start, then))

    def _start(self, fn: Callable[[], Any], t: float, then: Callable[[float], None] | None) -> None:
        if not self.alive():
            return
        slot = min(range(len(self.free)), key=self.free.__getitem__)
        begin = max(t, self.free[slot])
        if begin > t:  # wait for the worker, in time order with everything else
            self.loop.at(begin, functools.partial(self._start, fn, begin, then))
            return
        with self.loop.clock.task(self.host, self.activity, begin) as task:
            try:
                fn()
            except HostKilled:
                return
        self.free[slot] = task.t
        self.busy += task.t - begin
        if then is not None:
            then(task.t)


class LaneExecutor:
    """What the daemon's code submits to a thread pool, run on a lane instead."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        done: Future[Any] = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except Exception as e:  # the pool's caller looks at it, if ever
                done.set_exception(e)

        self.lane.submit(run)
        return done

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


class OneRound:
    """An Event for a loop of the daemon's that waits on it, so that one call of the loop runs
    one round: `is_set` is false once, `wait` returns False once, and the timeout the loop
    asked for is kept (when it would have woken next)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.timeout: float | None = None

    def arm(self) -> None:
        self.rounds = 0
        self.timeout = None

    def is_set(self) -> bool:
        self.rounds += 1
        return self.rounds > 1

    def wait(self, timeout: float | None = None) -> bool:
        self.timeout = timeout
        self.rounds += 1
        return self.rounds > 1

    def set(self) -> None:
        return None

    def clear(self) -> None:
        return None


def storage_clock(clock: VirtualClock) -> Clock:
    """The clocks a simulated host's storage reads (its repository's `clock`)."""
    return Clock(wall=clock.wall, monotonic=clock.monotonic)
