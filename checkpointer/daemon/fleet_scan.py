"""What this host watches of the others (fleet mode, issue 27): per scan (`fleet.scan_every`)
one listing of `hosts/`, whatever the number of workloads; of a host found dead, its heartbeat
and the leases that are this host's turn to take; and a slow sweep of `leases/`.

- The listing gives each heartbeat's version (no GET). A version unchanged for TTL on this
  host's monotonic clock makes its host a suspect: its heartbeat is read once, and if it is
  still that version (and its own TTL has passed too) the host is dead (storage/heartbeats.py
  Liveness: why TTL and not TTL + skew). Its workloads (its heartbeat lists them) are ranked
  over the hosts this one sees alive and eligible (fleet_rank.py): a workload whose rank here
  is k (0: first) is this host's turn k scan periods after the judgement, up to FALLBACKS; at
  its turn its lease is read and, still the dead host's, offered for failover (the takeover's
  If-Match decides between two hosts that both think it theirs). Offered and not taken, it
  is looked at again every DEAD_RETRY seconds. So a death costs the fleet up to FALLBACKS + 1
  lease reads per workload, not one per workload and watcher (99 x 100 at 100 hosts before),
  and each host's takeovers are its share, not all of them.
- Eligibility of the others (failover on, not draining) comes from their heartbeats, read
  round-robin, at most one a scan, each host about every ELIGIBILITY_EVERY seconds: O(hosts)
  GETs per host every 10 min. A host not read yet counts as eligible; one wrongly counted
  costs the workloads ranked to it one scan period.
- The sweep, every SWEEP_EVERY seconds, lists `leases/` (1,000 a request) with versions and
  reads only the leases whose version changed since the last sweep (a lease never read here
  only if this host holds it, a host found dead here named it, or it is among the first
  FALLBACKS + 1 of the hosts alive now to take it over, one rank more every ESCALATE_EVERY
  it stays unread: asked again at every sweep), a share of each scan period at a time
  (fleet_sweep.py: read at once, they held up the listing). It finds what no heartbeat
  names: a lease whose holder died between writing it and its first heartbeat, or whose
  holder has no heartbeat at all (dead after TTL from when it was noticed); a lease of this
  host taken by another (the copy here is then lost); a dead host's lease that none of its
  first FALLBACKS + 1 ranked hosts took (each refused, or died too): the last resort, which
  offers it to every other host in turn; and it keeps the view of who owns what
  (`checkpointer status`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checkpointer.daemon.fleet_rank import rank, within
from checkpointer.daemon.fleet_sweep import LeaseSweep
from checkpointer.daemon.lease_watchdog import LeaseWatchdog
from storage.errors import CorruptCheckpoint, StorageError
from storage.heartbeats import MISSING, Heartbeat, Heartbeats, Liveness
from storage.leases import Lease, Leases, LeaseState

log = logging.getLogger(__name__)

SWEEP_EVERY = 600.0  # seconds between sweeps of leases/ (Fleet.sweep_every)
DEAD_RETRY = 60.0  # seconds between looks at a dead host's leases offered and not taken yet
# How many hosts after the first may take a workload in turn, a scan period apart; past them
# (all refused or dead too) the sweep takes it. 3 turns: a dead first choice and a refusing
# second one still fail over within TTL + 3 periods; each host reads ~3/H of a death's leases.
FALLBACKS = 2
ELIGIBILITY_EVERY = 600.0  # seconds between reads of each other host's heartbeat (eligibility)
# A lease never read here, unchanged, is read by one more rank of its rendezvous order every
# ESCALATE_EVERY seconds (fleet_sweep.py: skipped is not forgotten).
ESCALATE_EVERY = 600.0


@dataclass
class _Dead:
    """A host found dead: when, and this host's workloads of it to look at, by when each."""

    judged: float
    turns: dict[str, float] = field(default_factory=dict)  # workload -> when to look at it
    names: set[str] = field(default_factory=set)  # every workload its heartbeat named

    def turn(self, k: int, scan_every: float) -> float:
        """When rank `k` looks (the sweep's when past FALLBACKS)."""
        return self.judged + (k if k <= FALLBACKS else FALLBACKS + 1) * scan_every


def taken_from(ours: Lease, found: Lease) -> bool:
    """Whether `found` (read later than we wrote `ours`, or from an older listing) says the
    workload moved on without us: a newer step of its history, or our generation with
    another holder. An older one is a listing from before our write: nothing."""
    if found.holder == ours.holder and found.generation == ours.generation:
        return found.state in (LeaseState.HANDED, LeaseState.RELEASED)
    return found.order() > ours.order() or found.generation == ours.generation


class Watcher:
    """The other hosts as this host sees them. `act_on(lease, holder_dead)`: what a lease
    asks of this host (Fleet._act_on); `watchdog`: this host's own leases."""

    def __init__(
        self,
        heartbeats: Heartbeats,
        leases: Leases,
        liveness: Liveness,
        watchdog: LeaseWatchdog,
        act_on: Callable[[Lease, bool], None],
        failover: bool,
        monotonic: Callable[[], float] = time.monotonic,
        timing: tuple[float, float] = (10.0, 10.0),
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        """`timing`: (scan_every, renew_every); `draining`: whether this host drains now (it
        then takes a dead host's workload only after every other candidate's turn)."""
        self.host = leases.host
        self.scan_every, self.renew_every = timing
        self.draining = draining
        self.heartbeats = heartbeats
        self.leases = leases
        self.liveness = liveness
        self.watchdog = watchdog
        self.act_on = act_on
        self.failover = failover
        self.monotonic = monotonic
        self.sweeper = LeaseSweep(leases.store, leases, monotonic)
        self._dead: dict[str, _Dead] = {}
        self._eligible: dict[str, tuple[bool, float]] = {}  # host -> (eligible, when read)

    @property
    def unowned(self) -> int:
        """Workloads of hosts found dead that are this host's turn to take and that it has not
        seen taken yet (summed over the fleet: about the workloads nobody took yet)."""
        return sum(len(d.turns) for d in self._dead.values())

    def candidates(self) -> set[str]:
        """The other hosts that may take a dead host's workload, as this one sees them: a
        heartbeat that changed lately (a live host's changes every renew_every; twice that
        plus a scan leaves room for a late one) and not known ineligible."""
        fresh = self.liveness.fresh(self.monotonic(), 2 * self.renew_every + self.scan_every)
        return {h for h in fresh if self._eligible.get(h, (True, 0.0))[0]}

    def my_rank(self, workload: str, candidates: set[str]) -> int:
        """This host's turn for `workload` (fleet_rank.py); a draining host's comes last."""
        if self.draining():
            return len(candidates)
        return rank(workload, self.host, candidates)

    def wake(self) -> float:
        """When a dead host's workload is next this host's turn (monotonic; inf: none)."""
        return min((t for d in self._dead.values() for t in d.turns.values()), default=float("inf"))

    def holder_dead(self, host: str) -> bool:
        """Whether `host` was found dead and its heartbeat is still the version found dead
        (read now): asked by a takeover after it read the lease (storage/leases.py)."""
        judged = self.liveness.dead(host)
        if judged is None:
            return False
        try:
            now = self.heartbeats.version_of(host)
        except StorageError as e:
            log.warning("fleet: cannot read the heartbeat of host %s again: %s", host, e)
            return False
        return (now or MISSING) == judged

    # -- every tick ------------------------------------------------------------------------

    def look(self) -> None:
        """One listing of `hosts/`; read the heartbeat of each suspect, and the leases of each
        host found dead; look again at dead hosts' leases not taken yet."""
        started = self.monotonic()
        versions = self.heartbeats.listing()
        returned = self.monotonic()
        for host in self.liveness.observe(versions, started, returned):
            self._suspect(host, started)
        for host in list(self._dead):
            if self.liveness.dead(host) is None:
                log.warning("fleet: host %s is alive again (its heartbeat changed)", host)
                del self._dead[host]
            else:
                self._look_at(host)
        self._learn_eligibility(versions)

    def _learn_eligibility(self, versions: dict[str, str]) -> None:
        """Read the heartbeat of the listed host least recently read, if that was more than
        ELIGIBILITY_EVERY ago: at most one GET a scan."""
        now = self.monotonic()
        due = [
            (self._eligible.get(h, (True, float("-inf")))[1], h)
            for h in versions
            if h != self.host and self.liveness.dead(h) is None
        ]
        if not due or min(due)[0] > now - ELIGIBILITY_EVERY:
            return
        host = min(due)[1]
        found = self._heartbeat(host)
        if found is not None:
            beat = found[0]
            eligible = beat is None or (beat.failover and not beat.draining)
            self._eligible[host] = (eligible, now)

    def _heartbeat(self, host: str) -> tuple[Heartbeat | None, str] | None:
        """`host`'s heartbeat (None: none, or unreadable) and its version (MISSING: none);
        None if the store does not answer now."""
        try:
            found = self.heartbeats.read(host, strict=False)
        except StorageError as e:
            log.warning("fleet: cannot read the heartbeat of host %s: %s", host, e)
            return None
        return found if found is not None else (None, MISSING)

    def _suspect(self, host: str, started: float) -> None:
        found = self._heartbeat(host)
        read = self.monotonic()  # a version new to us counts from here, not from `started`
        if found is None:
            return
        beat, version = found
        if not self.liveness.confirm(host, version, beat.ttl if beat else None, started, read):
            return
        names = self.sweeper.cached(host)  # what no heartbeat of it names
        if beat is not None:
            names |= set(beat.workloads) | set(beat.prepared)
        dead = self._dead[host] = _Dead(self.monotonic(), names=set(names))
        candidates = self.candidates() - {host}
        for name in names:
            if not self.failover:  # counted as unowned, read by nobody: not taken here
                dead.turns[name] = float("inf")
            elif (k := self.my_rank(name, candidates)) <= FALLBACKS:
                dead.turns[name] = dead.turn(k, self.scan_every)
        log.warning(
            "fleet: host %s is dead (its heartbeat %s for its TTL); %d of its %d workloads "
            "are this host's to take (first: %d)%s",
            host,
            "missing" if version == MISSING else "unchanged",
            len(dead.turns),
            len(names),
            sum(t <= dead.judged for t in dead.turns.values()),
            "" if self.failover else " (failover is off: not taken over)",
        )
        self._look_at(host)

    def _look_at(self, host: str) -> None:
        """Read the leases of a dead host's workloads whose turn here has come; offer those it
        still holds (looked at again DEAD_RETRY later), forget the others."""
        dead = self._dead[host]
        now = self.monotonic()
        for name in sorted(n for n, t in dead.turns.items() if t <= now):
            try:
                held = self.leases.read(name)
            except CorruptCheckpoint:
                del dead.turns[name]
                continue
            except StorageError as e:
                log.warning("fleet: cannot read the lease of %s: %s", name, e)
                continue  # at the next scan
            still = (
                held is not None
                and held.lease.holder == host
                and held.lease.state is not LeaseState.RELEASED
            )
            if not still:
                del dead.turns[name]
                continue
            dead.turns[name] = now + DEAD_RETRY
            assert held is not None
            self.act_on(held.lease, True)

    # -- the sweep -------------------------------------------------------------------------

    def sweep(self) -> None:
        """Begin the slow look at every lease (module docstring): list `leases/`; what was
        read before and is unchanged is looked at again now, the changed leases are read a
        share at a time (`sweep_some`)."""
        now = self.monotonic()
        candidates = self.candidates()
        own = set(self.watchdog.names())
        dead = {name for d in self._dead.values() for name in d.names}
        draining = self.draining()

        def ours(workload: str, unread: float) -> bool:
            """Never read here (for `unread` seconds since first listed, unchanged): read it
            if this host holds it, if a host found dead here named it (whatever its first
            ranked did, it is offered here at the sweep's turn), or if this host would take
            it over: among the first FALLBACKS + 1 of the hosts alive now, one more for each
            ESCALATE_EVERY it stayed unread here (an orphan its first ranked refuse)."""
            if workload in own or workload in dead:
                return True
            k = FALLBACKS + int(unread // ESCALATE_EVERY)
            return not draining and within(workload, self.host, candidates, k)

        listed = self.sweeper.list_changed(ours)
        for lease in self.sweeper.unchanged():
            self._swept(lease, now)
        for name in set(self.watchdog.names()) - listed:
            self._gone(name)

    def sweep_some(self, until: float) -> None:
        """Read changed leases of the sweep under way until monotonic `until`."""
        if self.sweeper.pending:
            for lease in self.sweeper.read_some(until):
                self._swept(lease, self.monotonic())

    def _swept(self, lease: Lease, now: float) -> None:
        """What a lease found by the sweep asks: ours taken is lost; a holder never listed is
        noticed missing; a dead holder's, at the sweep's turn, offered; the rest to act_on."""
        ours = self.watchdog.held(lease.workload)
        if ours is not None:
            if taken_from(ours.lease, lease):
                log.error(
                    "fleet: the lease of %s is now %s's (generation %d): ours is lost",
                    lease.workload,
                    lease.holder,
                    lease.generation,
                )
                self.watchdog.lose(lease.workload)
            return
        holder = lease.holder
        if holder != self.host and not self.liveness.listed(holder):
            self.liveness.notice_missing(holder, now)
        dead = (
            holder != self.host
            and lease.state is not LeaseState.RELEASED
            and self.liveness.dead(holder) is not None
        )
        self.act_on(lease, dead and self._sweeps_turn(lease, now))

    def _sweeps_turn(self, lease: Lease, now: float) -> bool:
        """Whether the sweep takes this lease of a dead holder now: the ranked hosts had
        their turns (FALLBACKS + 1 scan periods since the judgement here). Before that, one
        of this host's turns is kept for the scan, and others' are left to them."""
        if not self.failover:
            return False
        dead = self._dead.setdefault(lease.holder, _Dead(now))
        if now >= dead.turn(FALLBACKS + 1, self.scan_every):
            return True
        k = self.my_rank(lease.workload, self.candidates() - {lease.holder})
        if k <= FALLBACKS:
            dead.turns.setdefault(lease.workload, dead.turn(k, self.scan_every))
        return False

    def _gone(self, name: str) -> None:
        """A lease we hold that the sweep did not list: read it (the listing may predate our
        claim); gone, it is lost (deleted by someone who can write the bucket)."""
        try:
            held = self.leases.read(name)
        except StorageError:  # unreadable or replayed too: nobody can take it with that
            return
        ours = self.watchdog.held(name)
        if ours is not None and (held is None or taken_from(ours.lease, held.lease)):
            log.error("fleet: the lease of %s is gone or taken: ours is lost", name)
            self.watchdog.lose(name)
