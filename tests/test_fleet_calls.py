"""A migration's source calls its target through the bucket, so that the target looks at the
lease at once (storage/calls.py, checkpointer/daemon/fleet_calls.py)."""

from __future__ import annotations

import time
from pathlib import Path

from checkpointer.daemon.fleet_calls import CallWatcher
from storage.backends import LocalBlobStore
from storage.calls import Calls
from storage.crypto import Plain
from storage.keys import call_key


def test_a_call_reaches_its_host_once_and_junk_calls_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "bucket")
    a, b = Calls(store, Plain(), "a"), Calls(store, Plain(), "b")
    a.call("b", "old")  # before B's daemon started: old news
    heard: list[str] = []
    watcher = CallWatcher(b, heard.append)
    watcher.start()
    try:
        a.call("b", "web")
        deadline = time.monotonic() + 5
        while heard != ["web"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.2)  # no second answer to the same call
        assert heard == ["web"]
        key = call_key("b")
        _, version = store.get_versioned(key)
        store.put_if(key, b"not a call", version)  # planted
        time.sleep(1.2)
        assert heard == ["web"]
        a.call("b", "web")  # called again: heard again
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard == ["web", "web"]
    finally:
        watcher.stop()
