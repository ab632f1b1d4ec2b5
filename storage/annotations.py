"""What this process knows of a workload's pins and drill marks, without listing them at
every commit (fleet mode; docs/fleet.md, R4).

Retention needs both (a pinned checkpoint is kept, and the newest verified one), and a
commit's head write applies retention: listing `pins/<w>/` and `marks/<w>/` there would cost
two LISTs a commit. So retention reads this view instead: loaded at the first use, refreshed
by the owner's hourly job (storage/fencing.py `tidy`), and updated at once by what this
process writes itself (`pin`, `unpin`, a drill's mark through `Repository.write_mark`).

Why a stale view is safe: retention only drops from the head; the manifest of a dropped
checkpoint is deleted by the owner's job, after the grace period and after that job listed
pins and marks afresh; a dropped checkpoint found pinned, or verified and newer than every
verified one the head names, is named again instead of deleted. A stale view costs at most a
checkpoint that leaves the head for a while, never one that is deleted while pinned.
"""

from __future__ import annotations

import threading

from storage import marks, pins
from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.marks import Mark


class Annotations:
    """Pins and marks by workload, as last listed or written here. Thread-safe."""

    def __init__(self, backend: BlobStore, codec: Codec) -> None:
        self.backend = backend
        self.codec = codec
        self._lock = threading.Lock()
        self._pins: dict[str, set[str]] = {}
        self._marks: dict[str, dict[str, Mark]] = {}

    def refresh(self, workload: str) -> None:
        """List both afresh (two LISTs, a GET of each mark and pin): the owner's job."""
        pinned = pins.pinned(self.backend, self.codec, workload)
        marked = marks.read(self.backend, self.codec, workload)
        with self._lock:
            self._pins[workload] = pinned
            self._marks[workload] = marked

    def _loaded(self, workload: str) -> None:
        with self._lock:
            if workload in self._pins:
                return
        self.refresh(workload)

    def pins(self, workload: str) -> set[str]:
        self._loaded(workload)
        with self._lock:
            return set(self._pins.get(workload, ()))

    def marks(self, workload: str) -> dict[str, Mark]:
        self._loaded(workload)
        with self._lock:
            return dict(self._marks.get(workload, {}))

    def pinned(self, workload: str, checkpoint_id: str, on: bool) -> None:
        """This process pinned (`on`) or unpinned a checkpoint."""
        with self._lock:
            held = self._pins.get(workload)
            if held is not None:
                (held.add if on else held.discard)(checkpoint_id)

    def marked(self, workload: str, mark: Mark) -> None:
        """This process stored a drill's mark."""
        with self._lock:
            held = self._marks.get(workload)
            if held is not None:
                held[mark.id] = mark

    def unmarked(self, workload: str, checkpoint_ids: set[str]) -> None:
        with self._lock:
            held = self._marks.get(workload, {})
            for cid in checkpoint_ids:
                held.pop(cid, None)

    def forget(self, workload: str) -> None:
        """Another host may pin, unpin or mark it from now on: listed afresh at next use."""
        with self._lock:
            self._pins.pop(workload, None)
            self._marks.pop(workload, None)

    def keep_only(self, keep: set[str]) -> None:
        with self._lock:
            for held in (self._pins, self._marks):
                for w in [w for w in held if w not in keep]:
                    del held[w]
