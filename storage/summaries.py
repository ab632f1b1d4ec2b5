"""What a process remembers of the manifests it read, and the packs they reference.

Manifests never change once written, so each is parsed once (a 1 GB image's manifest is ~11 MB
of JSON, ~30 MB while parsed) and a small summary kept: its info for `list`, its packs, and
where they live (its workload's prefix, or the legacy flat layout: `Manifest.pack_home`).
Garbage collection asks here which packs the manifests under a prefix reference
(storage/gc.py); a manifest that cannot be read is reported, never taken to reference
nothing, since its packs would then be deleted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from storage.errors import CheckpointNotFound, StorageError
from storage.keys import ObjectName, manifest_key
from storage.manifest import Manifest


@dataclass(frozen=True)
class CheckpointInfo:
    """What `list` shows of a checkpoint without reading its chunks."""

    id: str
    workload: str
    created: datetime
    size_bytes: int
    new_bytes: int
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Summary:
    """What is remembered of a manifest once read."""

    info: CheckpointInfo
    packs: tuple[str, ...]
    home: str | None  # Manifest.pack_home

    @classmethod
    def of(cls, m: Manifest) -> Summary:
        info = CheckpointInfo(m.id, m.workload, m.created, m.size_bytes, m.new_bytes, m.metadata)
        return cls(info, tuple(m.packs), m.pack_home)


@dataclass
class References:
    """The packs some manifests reference, by where they live (the workload whose prefix
    holds them; None: the legacy flat layout), and the manifests that could not be read
    (their packs unknown: garbage collection must not run on that scope)."""

    packs: dict[str | None, set[str]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    def under(self, home: str | None) -> set[str]:
        return self.packs.get(home, set())


Reader = Callable[[str, str], Manifest]  # (workload, checkpoint id) -> the manifest, checked


class Summaries:
    """Summaries by manifest key. Safe to use from several threads."""

    def __init__(self, read: Reader) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._held: dict[str, Summary] = {}
        # Legacy collection: each manifest's flat packs (none for a manifest of this version),
        # by key. Not summaries: the manifests of other hosts' workloads are read once per
        # process and cost ~100 bytes each to remember.
        self._flat: dict[str, tuple[str, ...]] = {}

    def get(self, workload: str, checkpoint_id: str) -> Summary:
        key = manifest_key(workload, checkpoint_id)
        with self._lock:
            held = self._held.get(key)
        if held is not None:
            return held
        summary = Summary.of(self._read(workload, checkpoint_id))
        with self._lock:
            self._held[key] = summary
        return summary

    def put(self, m: Manifest) -> None:
        """A manifest this process just wrote."""
        with self._lock:
            self._held[manifest_key(m.workload, m.id)] = Summary.of(m)

    def drop(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._flat.clear()

    def keep_workloads(self, keep: set[str]) -> None:
        """Forget the summaries of other workloads (ones that moved to other hosts)."""
        with self._lock:
            for key in [k for k, s in self._held.items() if s.info.workload not in keep]:
                del self._held[key]

    def references(self, prefix: str, names: Iterable[ObjectName]) -> References:
        """The packs the manifests `names` (all those listed under `prefix`) reference; the
        summaries of manifests under `prefix` not listed any more are forgotten."""
        out = References()
        listed: set[str] = set()
        for name in names:
            key = manifest_key(name.workload, name.id)
            listed.add(key)
            try:
                summary = self.get(name.workload, name.id)
            except CheckpointNotFound:
                continue  # deleted since the listing
            except StorageError as e:
                out.unreadable.append(f"{key}: {e}")
                continue
            out.packs.setdefault(summary.home, set()).update(summary.packs)
        with self._lock:
            for key in [k for k in self._held if k.startswith(prefix) and k not in listed]:
                del self._held[key]
        return out

    def flat_references(self, names: Iterable[ObjectName]) -> References:
        """The legacy flat packs the manifests `names` (every manifest of the repository)
        reference."""
        out = References(packs={None: set()})
        listed: set[str] = set()
        for name in names:
            key = manifest_key(name.workload, name.id)
            listed.add(key)
            with self._lock:
                flat = self._flat.get(key)
                held = self._held.get(key)
            if flat is None:
                try:
                    s = held if held is not None else Summary.of(self._read(name.workload, name.id))
                except CheckpointNotFound:
                    continue
                except StorageError as e:
                    out.unreadable.append(f"{key}: {e}")
                    continue
                flat = s.packs if s.home is None else ()
                with self._lock:
                    self._flat[key] = flat
            out.packs[None].update(flat)
        with self._lock:
            for key in set(self._flat) - listed:
                del self._flat[key]
        return out
