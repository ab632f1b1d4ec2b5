"""Host records: what one host of a fleet offers (its CPU, for `checkpointer hosts`), one
small sealed object per host, `hostinfo/<host id>`.

Not in the heartbeat: a heartbeat is written every few seconds by every host and read by
every other, so each byte in it is paid for at every tick of the fleet; what a host offers
changes only when its hardware or software does. The host writes its record at daemon start,
and only if it differs from the stored one (one GET per start, a PUT only after a change).

storage/ knows nothing of CPUs: a record is an opaque JSON object the codec authenticates
under its own key. Read back as hostile input: bounded in size before it is read, and one
that does not open, does not parse or names another host is no record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobNotFound, CorruptCheckpoint, PreconditionFailed, StorageError
from storage.keys import check_host_id

HOSTINFO = "hostinfo/"
MAX_RECORD_BYTES = 16 * 1024


def record_key(host: str) -> str:
    return f"{HOSTINFO}{check_host_id(host)}"


class HostRecords:
    """Each host's record in a shared store, sealed with the repository's codec."""

    def __init__(self, store: BlobStore, codec: Codec) -> None:
        self.store = store
        self.codec = codec

    def publish(self, host: str, record: dict[str, Any]) -> bool:
        """Store `record` as `host`'s, unless it is stored already; True if written. Written
        in place with a conditional write (`put_if`), so a store that keeps an old version
        for a moment after an overwrite is never asked to."""
        key = record_key(host)
        doc = dict(record, host=host)
        raw = json.dumps(doc, sort_keys=True).encode()
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(
                f"the record of host {host} is {len(raw)} bytes, over {MAX_RECORD_BYTES}"
            )
        for _ in range(3):
            try:
                blob, version = self.store.get_versioned(key, MAX_RECORD_BYTES)
                if self._opened(key, blob, host) == doc:
                    return False
            except BlobNotFound:
                version = None
            except CorruptCheckpoint:  # too large (planted): replace it
                self.store.delete(key)
                version = None
            try:
                self.store.put_if(key, self.codec.seal(key, raw), version)
                return True
            except PreconditionFailed:
                continue  # written meanwhile (a previous daemon of this host): look again
        return False

    def read(self, hosts: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Host -> its record, for each of `hosts` whose record opens and parses (the live
        hosts: nothing is listed, so a planted pile of keys costs nothing)."""
        out: dict[str, dict[str, Any]] = {}
        for host in hosts:
            try:
                key = record_key(host)
                record = self._opened(key, self.store.get(key, MAX_RECORD_BYTES), host)
            except (ValueError, StorageError):
                continue
            if record is not None:
                out[host] = record
        return out

    def _opened(self, key: str, blob: bytes, host: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.codec.open(key, blob))
        except (CorruptCheckpoint, ValueError, RecursionError):
            return None
        if not isinstance(doc, dict) or doc.get("host") != host:
            return None
        return doc
