"""Watching this host's call object (storage/calls.py): a migration's source calls its target,
which looks at the workload's lease at once instead of at its next scan. That is what makes
`migrate` take seconds, not a lease scan period (10 s by default), for a small workload."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from storage.calls import CALL_POLL, Calls
from storage.errors import StorageError

log = logging.getLogger(__name__)


class CallWatcher:
    def __init__(self, calls: Calls, on_call: Callable[[str], None]) -> None:
        self.calls = calls
        self.on_call = on_call
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-calls", daemon=True)
        self._seen: str | None = None

    def start(self) -> None:
        # A call from before this daemon started is old news: the scan sees its lease.
        with contextlib.suppress(StorageError):
            self._seen, _ = self.calls.poll(None)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(CALL_POLL):
            try:
                self._seen, workload = self.calls.poll(self._seen)
            except StorageError as e:
                log.debug("fleet: cannot read this host's calls: %s", e)
                continue
            except Exception:  # never the end of the watcher
                log.exception("fleet: reading this host's calls failed")
                continue
            if workload is not None:
                try:
                    self.on_call(workload)
                except Exception:
                    log.exception("fleet: a call about %s failed", workload)
