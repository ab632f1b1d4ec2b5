"""One simulated host of the fleet (bench.fleet_scale): the daemon's real fleet, lease, commit,
retention and GC code, driven by the virtual clock's event loop (sim_clock.py) against the
shared simulated bucket (sim_store.py).

What is real: `Fleet` (checkpointer/daemon/fleet.py) with its `Leases` and `LeaseWatchdog`,
`FencedOwnership` (claims bump the head), `Repository` with `Heads` (fenced commits, per
workload dedup), `Maintenance.apply_retention` after every checkpoint as the engine runs it,
`collect_garbage` hourly, through the daemon's `RetryingBlobStore`. What stands in for the
rest of the daemon: a checkpoint is a commit of a small image (16 pages and a small file, one
page and the file new each time) written to a scratch folder; a takeover claims the lease and
reads the checkpoints a restore would choose from, without running CRIU.

The daemon's threads are the lanes of sim_clock.py: the scan loop calls `_scan_tick`, the
watchdog's loop runs one round per call (its events are `OneRound`s), renewals and engine
hooks are submitted to lanes in place of its thread pools, the call watcher polls once per
call. None of their threads is started.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path

import numpy as np

from bench.sim_clock import (
    EPOCH,
    EventLoop,
    Lane,
    LaneExecutor,
    OneRound,
    VirtualClock,
    storage_clock,
)
from bench.sim_store import SimStore
from checkpointer.config import Config, Retention
from checkpointer.config.model import FleetConfig
from checkpointer.daemon.fleet import Fleet, FleetHooks
from checkpointer.engine.events import Silent
from checkpointer.engine.fenced_ownership import FencedOwnership
from checkpointer.engine.maintenance import Maintenance
from checkpointer.errors import NotOwner
from storage import Repository
from storage.backends.retrying import RetryingBlobStore
from storage.crypto import Codec
from storage.errors import StorageError
from storage.heads import Heads
from storage.manifest import CHUNK_SIZE

IMAGE_PAGES = 16
SCHEDULER_WORKERS = 10  # APScheduler's default thread pool
# Issue 27: the fleet runs one synchronous round at a time (heartbeats, no lease renewals).
STEPPED = hasattr(Fleet, "step")


def scan_every(seconds: float) -> dict[str, float]:
    """fleet.scan_every, for code that has it (the code before it lists hosts each renewal)."""
    return {"scan_every": seconds} if "scan_every" in FleetConfig.model_fields else {}


@dataclass
class Settings:
    ttl: float = 30.0
    renew_every: float = 10.0
    scan_every: float = 3.0  # fleet.scan_every: the listing of hosts/
    skew: float = 5.0
    checkpoint_every: float = 60.0
    gc_every: float = 3600.0
    gc_grace: float = 600.0  # steady state within the hour: old packs are rechecked, GC deletes
    keep_last: int = 10
    commit_until: float = float("inf")  # no checkpoint is started after this


@dataclass
class Record:
    """What happened to a host's workloads, for the report."""

    commits: int = 0
    commit_failures: int = 0
    skipped_not_owner: int = 0
    freezes: int = 0  # a lease reached its deadline unrenewed: the copy was stopped
    lost: int = 0  # the lease was found taken while this host was alive
    takeovers: list[tuple[str, float]] = field(default_factory=list)  # (workload, when)
    gc_runs: int = 0
    ticks: int = 0


class Images:
    """The images the simulated checkpoints commit: per workload, 15 pages that never change
    and one page and a small file new at every checkpoint (random bytes: stored raw)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._count: dict[str, int] = {}

    def write(self, name: str) -> Path:
        n = self._count[name] = self._count.get(name, 0) + 1
        seed = zlib.crc32(name.encode())
        base = np.random.default_rng(seed).bytes((IMAGE_PAGES - 1) * CHUNK_SIZE)
        new = np.random.default_rng([seed, n]).bytes(CHUNK_SIZE)
        (self.folder / "pages-1.img").write_bytes(base + new)
        (self.folder / "core-1.img").write_bytes(f"{name} checkpoint {n}\n".encode() * 8)
        return self.folder


class SimHost:
    def __init__(
        self,
        host: str,
        bucket: SimStore,
        codec: Codec,
        loop: EventLoop,
        state_dir: Path,
        settings: Settings,
        images: Images,
        commits: Callable[[str], bool],
        wall_offset: float = 0.0,
    ) -> None:
        """`commits`: whether a workload's checkpoints are simulated (all, or a sample)."""
        self.id = host
        self.bucket = bucket
        self.loop = loop
        self.clock: VirtualClock = loop.clock
        self.s = settings
        self.images = images
        self.commits = commits
        self.alive = True
        self.record = Record()
        self.running: set[str] = set()
        self.frozen: set[str] = set()
        self.committing: set[str] = set()  # workloads whose checkpoints are simulated
        self._queued: set[str] = set()  # a checkpoint job waiting or running (max_instances)
        self._beating = False
        state_dir.mkdir(parents=True, exist_ok=True)
        config = Config.model_validate(
            {
                "state_dir": state_dir,
                "host": {"id": host},
                "fleet": {
                    "enabled": True,
                    "failover": True,
                    "lease_ttl": settings.ttl,
                    "renew_every": settings.renew_every,
                    "clock_skew": settings.skew,
                    **scan_every(settings.scan_every),
                },
                "retention": {"keep_last": settings.keep_last},
            }
        )
        self.retention: Retention = config.retention
        retries = config.storage.retries
        store = RetryingBlobStore(
            bucket, retries.attempts, retries.max_delay, sleep=self.clock.spend
        )
        heads = Heads(store, codec)
        clock = storage_clock(self.clock)
        self.repo = Repository(store, 4, settings.gc_grace, codec, heads, clock=clock)
        self.fleet = Fleet(
            config,
            store,
            codec,
            clock=lambda: EPOCH + self.clock.monotonic() + wall_offset,
            monotonic=self.clock.monotonic,
        )
        self.ownership = FencedOwnership(self.fleet, self.repo)
        # GC of the owned workloads whose checkpoints are simulated (what it reads is theirs;
        # the report scales it up by the sample). Before GC was scoped (issue 27), it took none.
        owned = {"owned": self._owned} if "owned" in signature(Maintenance).parameters else {}
        self.maintenance = Maintenance(self.repo, Silent(), None, 0, **owned)
        lane = functools.partial(Lane, loop, host, alive=lambda: self.alive)
        self.lanes = {
            "start": lane("start", 1),
            "scan": lane("scan", 1),
            "watchdog": lane("watchdog", 1),
            "renew": lane("renew", 16),
            "beat": lane("beat", 1),
            "calls": lane("calls", 1),
            "hook": lane("hook", 4),
            "checkpoint": lane("checkpoint", SCHEDULER_WORKERS),
            "gc": lane("gc", 1),
        }
        self._wire()

    # -- the daemon's threads, as lanes ----------------------------------------------------

    def _wire(self) -> None:
        """Today's code: the fleet's pools become lanes, its loops' events `OneRound`s. With
        `Fleet.step` (issue 27), the fleet runs without threads and hooks run inline."""
        f = self.fleet
        self.hooks = FleetHooks(
            lost=self._lost,
            offered=self._offered,
            known=lambda: sorted(self.running),
            prefetch=lambda name: None,
            newest=self._newest,
            freeze=self._freeze,
            thaw=self.frozen.discard,
        )
        self._calls_stop = OneRound()
        f._calls._stop = self._calls_stop  # type: ignore[assignment]
        if STEPPED:
            return
        f.hooks = self.hooks
        f.watchdog.copies = f.hooks
        f._hook_pool = LaneExecutor(self.lanes["hook"])  # type: ignore[assignment]
        f.watchdog._renewals = LaneExecutor(self.lanes["renew"])  # type: ignore[assignment]
        self._watch_stop, self._watch_wake = OneRound(), OneRound()
        f.watchdog._stop = self._watch_stop  # type: ignore[assignment]
        f.watchdog._wake = self._watch_wake  # type: ignore[assignment]

    def start(self, at: float, own: list[str]) -> None:
        """Start the daemon's loops, and register `own` meanwhile (claims, one after another
        as `checkpointer run` would); each workload's checkpoints start once it is claimed."""

        if STEPPED:

            def begin() -> None:
                self.fleet.start(self.hooks, threads=False)  # type: ignore[call-arg]
                # The engine's hooks on a pool of their own, as the daemon runs them, not
                # inline in the round (a takeover must not hold up the next heartbeat).
                runner = self.fleet.runner  # type: ignore[attr-defined]
                runner._pool = LaneExecutor(self.lanes["hook"])
                runner.inline = False

            self.lanes["start"].submit(begin, at=at, then=self._loops)
        else:
            self._loops(at)
        self._every("watchdog", self._watch_round, at)
        # One task a claim, one after another: a task runs whole when it starts, so 100
        # claims in one task (60 s at 100 ms a request) would show the other hosts leases
        # written "later" in virtual time (seen: takeovers of a live host's workloads).
        for name in own:
            self.lanes["start"].submit(functools.partial(self._register, name), at=at)

    def _register(self, name: str) -> None:
        try:
            self._claim(name, None)
        except (NotOwner, StorageError):
            return
        self.running.add(name)
        if self.commits(name):
            self.schedule_checkpoints(name, self.clock.monotonic())

    def _loops(self, at: float) -> None:
        self.lanes["scan"].submit(self._scan, at=at)
        self._every("calls", self._poll_calls, at)
        gc_phase = float(np.random.default_rng(zlib.crc32(self.id.encode())).random())
        self.lanes["gc"].submit(self._gc, at=at + gc_phase * self.s.gc_every)

    def _claim(self, name: str, newest: str | None) -> None:
        """FencedOwnership.claim: with the newest checkpoint before issue 27, without after."""
        if STEPPED:
            self.ownership.claim(name)  # type: ignore[call-arg]
        else:
            self.ownership.claim(name, newest)

    def _every(self, lane: str, round_: Callable[[], float], at: float) -> None:
        """A loop that waits after each round as long as the round says."""
        wait = [0.0]

        def run() -> None:
            wait[0] = round_()

        self.lanes[lane].submit(
            run, at=at, then=lambda end: self._every(lane, round_, end + wait[0])
        )

    def _scan(self) -> None:
        """The scan thread's loop: a round, then as long as the round says (Fleet._scan_loop:
        scan_every, or sooner when a host may be judged dead or a takeover is due)."""
        self.record.ticks += 1
        if STEPPED:  # the scan thread's round; the heartbeat is the watchdog's (not step())
            wake = self.fleet.scan()  # type: ignore[attr-defined]
        else:
            self.fleet._scan_tick()
            wake = self.clock.monotonic() + self.s.renew_every
        self.loop.at(
            max(wake, self.clock.monotonic()), lambda: self.lanes["scan"].submit(self._scan)
        )

    def _watch_round(self) -> float:
        """One round of the watchdog's thread; how long it then waits."""
        if STEPPED:  # its loop, one round: the deadline, the heartbeat when due
            wd = self.fleet.watchdog
            if wd.copies is None:  # the fleet has not started yet
                return 0.5
            wake = wd.check()
            if wd.due() and not self._beating:
                self._beating = True
                self.lanes["beat"].submit(self._beat)
            return max(0.01, min(wake - self.clock.monotonic(), 0.5))
        self._watch_stop.arm()
        self._watch_wake.arm()
        self.fleet.watchdog._watch()
        return self._watch_wake.timeout or 0.5

    def _beat(self) -> None:
        """The heartbeat, on a thread of its own (one in flight), as the watchdog starts it."""
        try:
            self.fleet.watchdog.beat()  # type: ignore[attr-defined]
        except StorageError:
            pass
        finally:
            self._beating = False

    def _poll_calls(self) -> float:
        self._calls_stop.arm()
        self.fleet._calls._loop()
        return self._calls_stop.timeout or 0.5

    # -- checkpoints, retention, GC --------------------------------------------------------

    def schedule_checkpoints(self, name: str, start: float) -> None:
        """An interval job from `start` (its phase is the workload's), as APScheduler runs it:
        a run due while the previous one still waits or runs is skipped."""
        self.committing.add(name)
        phase = (zlib.crc32(name.encode()) % 1000) / 1000 * self.s.checkpoint_every

        def due(at: float) -> None:
            if not self.alive or name not in self.committing or at >= self.s.commit_until:
                return
            if name not in self._queued:
                self._queued.add(name)
                self.lanes["checkpoint"].submit(functools.partial(self._checkpoint, name), at=at)
            self.loop.at(at + self.s.checkpoint_every, lambda: due(at + self.s.checkpoint_every))

        self.loop.at(start + phase, lambda: due(start + phase))

    def _checkpoint(self, name: str) -> None:
        """engine.checkpoint: the lease's generation, the commit, retention."""
        self._queued.discard(name)
        if name not in self.running or name in self.frozen:
            return
        try:
            generation = self.ownership.hold(name)
        except NotOwner:
            self.record.skipped_not_owner += 1
            return
        folder = self.images.write(name)
        try:
            self.repo.commit(name, folder, {"lease_generation": generation}, generation)
        except StorageError:
            self.record.commit_failures += 1
            return
        self.record.commits += 1
        self.maintenance.apply_retention(name, self.retention, [])

    def _gc(self) -> None:
        self.record.gc_runs += 1
        self.maintenance.scheduled_gc()
        self.loop.at(
            self.clock.monotonic() + self.s.gc_every, lambda: self.lanes["gc"].submit(self._gc)
        )

    # -- the engine's hooks ------------------------------------------------------------------

    def _owned(self) -> list[str]:
        return sorted(name for name in self.running if self.commits(name))

    def _newest(self, name: str) -> str | None:
        infos = self.repo.checkpoints(name)
        return infos[0].id if infos else None

    def _offered(self, name: str, reason: str) -> None:
        """engine.take_over, up to the restore's claim and its choice of checkpoint."""
        if name in self.running:
            return
        try:
            self._claim(name, None if STEPPED else self._newest(name))
            self.repo.checkpoints(name)  # what the restore chooses from
        except (NotOwner, StorageError):
            return
        self.running.add(name)
        self.record.takeovers.append((name, self.clock.monotonic()))
        if self.commits(name):
            self.schedule_checkpoints(name, self.clock.monotonic())

    def _lost(self, name: str, holder: str | None) -> None:
        if self.alive:
            self.record.lost += 1
        self.running.discard(name)
        self.committing.discard(name)

    def _freeze(self, name: str) -> bool:
        if name not in self.running or name in self.frozen:
            return False
        self.frozen.add(name)
        self.record.freezes += 1
        return True

    def kill(self) -> None:
        """From now on its tasks do not start, and the requests of one under way fail
        (sim_store.py raises HostKilled)."""
        self.alive = False
        self.bucket.dead[self.id] = self.clock.monotonic()
