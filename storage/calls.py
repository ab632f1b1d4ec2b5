"""Calls: a word from one host to another through the bucket, so that a migration's target
acts at once instead of at its next lease scan (`fleet.renew_every`, 10 s by default).

`calls/<host>` holds the latest call to that host, sealed like every object: who calls, for
which workload. The target reads its own call object often (one GET every CALL_POLL seconds:
at 100 hosts 200 GET/s for the fleet, ~$0.003 per host-hour at S3's prices), and on a new
version looks at that workload's lease at once. A call decides nothing: the lease says what
to do, so a planted or replayed call costs one lease read and nothing else.
"""

from __future__ import annotations

import json

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobNotFound, CorruptCheckpoint, PreconditionFailed
from storage.keys import call_key
from storage.manifest import check_workload_name

CALL_POLL = 0.5
_MAX_BYTES = 4096


class Calls:
    def __init__(self, store: BlobStore, codec: Codec, host: str) -> None:
        self.store = store
        self.codec = codec
        self.host = host

    def call(self, to: str, workload: str) -> None:
        """Tell host `to` to look at the lease of `workload` now."""
        key = call_key(to)
        doc = self.codec.seal(key, json.dumps({"from": self.host, "workload": workload}).encode())
        for _ in range(3):
            try:
                _, version = self.store.get_versioned(key, _MAX_BYTES)
            except BlobNotFound:
                version = None
            try:
                self.store.put_if(key, doc, version)
                return
            except PreconditionFailed:
                continue  # another host called at the same moment: call again after it

    def poll(self, seen: str | None) -> tuple[str | None, str | None]:
        """(the version of this host's call object, the workload of a call newer than
        `seen`, or None)."""
        key = call_key(self.host)
        try:
            blob, version = self.store.get_versioned(key, _MAX_BYTES)
        except BlobNotFound:
            return None, None
        if version == seen:
            return version, None
        try:
            doc = json.loads(self.codec.open(key, blob))
            return version, check_workload_name(str(doc["workload"]))
        except (CorruptCheckpoint, ValueError, KeyError, TypeError, RecursionError):
            return version, None  # planted or damaged: nothing to look at
