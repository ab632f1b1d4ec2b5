"""An in-process object store for the fleet simulation (bench.fleet_scale): the BlobStore
protocol (storage/backends/base.py) with S3's semantics where the fleet relies on them, and
every request counted, timed and throttled as S3 would.

- Conditional writes as S3 does them: `put_if` with If-None-Match (match None) or If-Match on
  an ETag-like version, PreconditionFailed otherwise; `put` is create-only.
- Listings in key order, a page of 1,000 keys per LIST request, as ListObjectsV2 pages.
- Each request costs the calling task `latency` virtual seconds (sim_clock.py) and is counted
  by kind (GET, HEAD, PUT, PUT_IF, LIST, DELETE), by prefix, and by the host and activity that
  sent it.
- Above S3's per-prefix rates (5,500 GET/HEAD and 3,500 PUT/LIST/DELETE a second) a request
  is answered 503 SlowDown: a TransientStorageError, which the daemon's retrying layer retries
  with its backoff (in virtual time). Throttled answers are counted apart and not billed.

It also watches the liveness objects the fleet keeps (`leases/`, `hosts/`): the largest gap
between two writes of one by the same host (its renewal gap), and every write of a lease by a
host other than its last writer (a takeover), with whether that writer was still alive.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from bench.sim_clock import EPOCH, HostKilled, VirtualClock
from storage.backends.base import BlobStore
from storage.errors import (
    BlobExists,
    BlobNotFound,
    PreconditionFailed,
    TransientStorageError,
    too_large,
)

PAGE = 1000
READS = ("GET", "HEAD")
LIMITS = {"read": 5500, "write": 3500}  # requests a second per prefix (S3's documented rates)
KINDS = ("GET", "HEAD", "PUT", "PUT_IF", "LIST", "DELETE")


@dataclass
class Blob:
    data: bytes
    version: str
    modified: float


@dataclass
class Takeover:
    key: str
    at: float
    by: str
    previous: str
    previous_alive: bool


@dataclass
class Liveness:
    """Writes of the objects that say a host is alive, per host."""

    last: dict[tuple[str, str], float] = field(default_factory=dict)  # (host, key) -> time
    writer: dict[str, str] = field(default_factory=dict)  # key -> host that wrote it last
    gap: dict[tuple[str, str], float] = field(default_factory=dict)  # (host, kind) -> max
    worst: dict[str, tuple[float, str, str, float]] = field(default_factory=dict)  # kind ->
    # (gap, host, key, when it began): where the largest gap of each kind was
    takeovers: list[Takeover] = field(default_factory=list)


def prefix_of(key: str, depth: int) -> str:
    """The S3 prefix a request counts against: the key's first `depth` folders."""
    parts = key.split("/")
    return "/".join(parts[: min(depth, len(parts) - 1)]) + "/" if len(parts) > 1 else "(root)"


class SimStore(BlobStore):
    def __init__(
        self,
        clock: VirtualClock,
        latency: float,
        throttle: bool = True,
        prefix_depth: int = 1,
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.throttle = throttle
        self.prefix_depth = prefix_depth
        self.objects: dict[str, Blob] = {}
        self._folders: dict[str, set[str]] = collections.defaultdict(set)
        self._versions = itertools.count(1)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()  # kind, prefix
        self.by_activity: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.throttled: collections.Counter[tuple[str, str]] = collections.Counter()
        self._second: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.peak: dict[tuple[str, str], int] = {}  # (prefix, read/write) -> busiest second
        self.dead: dict[str, float] = {}  # host -> when it was killed
        self.horizon = float("inf")  # requests answered later are not counted (a task that
        # started before the end of the run runs whole, past it)
        self.liveness = Liveness()

    # -- the cost of a request -------------------------------------------------------------

    def _request(self, kind: str, key: str) -> float:
        """Charge the running task one request; its time when the answer arrives."""
        t = self.clock.spend(self.latency)
        task = self.clock.current
        assert task is not None  # spend() refused otherwise
        if task.host in self.dead and t >= self.dead[task.host]:
            raise HostKilled(task.host)
        if t > self.horizon:
            return t
        prefix = prefix_of(key, self.prefix_depth)
        rate = "read" if kind in READS else "write"
        second = (prefix, rate, int(t))
        self._second[second] += 1
        n = self._second[second]
        if n > self.peak.get((prefix, rate), 0):
            self.peak[(prefix, rate)] = n
        if self.throttle and n > LIMITS[rate]:
            self.throttled[(kind, prefix)] += 1
            self.by_activity[(task.host, task.activity, "THROTTLED")] += 1
            raise TransientStorageError(f"{key}: SlowDown: 503 (please reduce your request rate)")
        self.counts[(kind, prefix)] += 1
        self.by_activity[(task.host, task.activity, kind)] += 1
        return t

    def _store(self, key: str, data: bytes | memoryview, t: float) -> str:
        version = f'"{next(self._versions):x}"'
        if key not in self.objects:
            self._index(key)
        self.objects[key] = Blob(bytes(data), version, EPOCH + t)
        return version

    def _index(self, key: str) -> None:
        parts = key.split("/")
        for i in range(len(parts)):
            folder = "/".join(parts[:i]) + "/" if i else ""
            entry = "/".join(parts[: i + 1]) + ("/" if i < len(parts) - 1 else "")
            self._folders[folder].add(entry)

    # -- the BlobStore protocol ------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        t = self._request("PUT", key)
        if key in self.objects:
            raise BlobExists(f"{key} exists")
        self._store(key, data, t)

    def get(self, key: str, limit: int | None = None) -> bytes:
        return self.get_versioned(key, limit)[0]

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        self._request("GET", key)
        blob = self.objects.get(key)
        if blob is None:
            raise BlobNotFound(key)
        if limit is not None and len(blob.data) > limit:
            raise too_large(key, len(blob.data), limit)
        return blob.data, blob.version

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        self._request("GET", key)
        blob = self.objects.get(key)
        if blob is None:
            raise BlobNotFound(key)
        return blob.data[offset : offset + length], len(blob.data)

    def exists(self, key: str) -> bool:
        self._request("HEAD", key)
        return key in self.objects

    def modified(self, key: str) -> float | None:
        self._request("HEAD", key)
        blob = self.objects.get(key)
        return None if blob is None else blob.modified

    def list(self, prefix: str) -> Iterator[str]:
        return (key for key, _ in self.list_versions(prefix))

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Keys with their versions (ETags), in key order, a LIST request a page."""
        keys = sorted(self._keys_under(prefix))
        for at in range(0, max(1, len(keys)), PAGE):
            self._request("LIST", prefix)
            for key in keys[at : at + PAGE]:
                blob = self.objects.get(key)
                if blob is not None:
                    yield key, blob.version

    def delete(self, key: str) -> None:
        self._request("DELETE", key)
        if self.objects.pop(key, None) is not None:
            folder = key.rpartition("/")[0]
            self._folders[folder + "/" if folder else ""].discard(key)

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        t = self._request("PUT_IF", key)
        blob = self.objects.get(key)
        if (blob is None) != (match is None) or (blob is not None and blob.version != match):
            raise PreconditionFailed(f"{key}: precondition failed")
        version = self._store(key, data, t)
        if key.startswith(("leases/", "hosts/")) and t <= self.horizon:
            self._written(key, t)
        return version

    def server_time(self) -> float | None:
        self._request("LIST", "")
        return int(self.clock.wall())  # HTTP Date: whole seconds

    def describe(self) -> str:
        return "the simulated bucket"

    # -- what the report needs ---------------------------------------------------------

    def _keys_under(self, prefix: str) -> Iterator[str]:
        folder = prefix.rpartition("/")[0]
        todo = [e for e in self._folders.get(folder + "/" if folder else "", ()) if e]
        while todo:
            entry = todo.pop()
            if not entry.startswith(prefix):
                continue
            if entry.endswith("/"):
                todo.extend(self._folders.get(entry, ()))
            else:
                yield entry

    def _written(self, key: str, t: float) -> None:
        """A liveness object written by the running task's host at `t`."""
        task = self.clock.current
        assert task is not None
        lv, host = self.liveness, task.host
        before = lv.writer.get(key)
        if before is not None and before != host:
            alive = before not in self.dead or self.dead[before] > t
            lv.takeovers.append(Takeover(key, t, host, before, alive))
            self._close(before, key, t)
        last = lv.last.get((host, key))
        if last is not None:
            self._gap(host, key, last, t)
        lv.last[(host, key)] = t
        lv.writer[key] = host

    def _close(self, host: str, key: str, t: float) -> None:
        """The open gap of `host` on `key` ends at `t` (or at its death: a dead host's
        silence is not a renewal gap)."""
        last = self.liveness.last.pop((host, key), None)
        if last is not None:
            self._gap(host, key, last, min(t, self.dead.get(host, t)))

    def _gap(self, host: str, key: str, start: float, end: float) -> None:
        kind, lv = key.partition("/")[0], self.liveness
        lv.gap[(host, kind)] = max(lv.gap.get((host, kind), 0.0), end - start)
        if end - start > lv.worst.get(kind, (0.0,))[0]:
            lv.worst[kind] = (end - start, host, key, start)

    def close_gaps(self, end: float) -> None:
        """Count the gaps still open at the end (or at a host's death) as gaps too: a lease
        never renewed again is the largest gap of all."""
        for host, key in list(self.liveness.last):
            self._close(host, key, end)
