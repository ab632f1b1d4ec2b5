"""The newest lease generation this host has seen per workload, kept across restarts: a lease
object put back into the bucket with an older generation (a bucket writer replaying it) is
refused after a restart too (storage/leases.py remembers them while the daemon runs)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from storage.leases import Leases

log = logging.getLogger(__name__)
Seen = dict[str, tuple[int, int]]


class SeenGenerations:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: Seen = {}

    def load(self, leases: Leases) -> None:
        try:
            raw = json.loads(self.path.read_text())
            seen = {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return  # none yet, or unreadable: start from what the bucket shows
        leases.remember(seen)
        self._saved = seen

    def save(self, leases: Leases) -> None:
        seen = leases.newest_seen()
        if seen == self._saved:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({k: list(v) for k, v in seen.items()}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("fleet: cannot save %s: %s", self.path, e)
            return
        self._saved = seen
