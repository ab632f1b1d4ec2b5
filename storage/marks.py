"""Marks: what a restore drill found of a checkpoint, one small sealed object each
(`marks/<workload>/<id>`), stored with the checkpoint so that every host of a fleet sees it.

storage/ knows nothing of drills: a mark is an opaque verdict (verified or not, and why in one
line) that the codec authenticates under its own key, like a pin; the engine decides what to do
with it (retention keeps a workload's newest verified checkpoint, `list` shows them). Read back
as hostile input: a mark that does not open, does not parse or names another checkpoint marks
nothing. A drill that finds something else than the mark says replaces it (delete, then
create: a store may serve the old one for a moment; the next reading corrects it).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass

from storage import keys
from storage.backends.base import BlobStore
from storage.crypto import Codec
from storage.errors import BlobExists, BlobNotFound, CorruptCheckpoint
from storage.keys import FileType, mark_key
from storage.manifest import check_workload_name

MAX_MARK_BYTES = 4096
MAX_WHY = 1000  # characters of the reason kept: one line


@dataclass(frozen=True)
class Mark:
    """The verdict on checkpoint `id`: `verified`, else `why` not (one line), found at `at`
    (Unix time, the drilling host's clock: shown, never compared) by `host` in `seconds`."""

    id: str
    verified: bool
    at: float
    host: str = ""
    why: str = ""
    seconds: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes, checkpoint_id: str) -> Mark | None:
        """A mark read back, or None if it is not one for `checkpoint_id`."""
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(d, dict) or d.get("id") != checkpoint_id:
            return None
        verified, at, host, why, seconds = (
            d.get(k) for k in ("verified", "at", "host", "why", "seconds")
        )
        if not (isinstance(verified, bool) and isinstance(host, str) and isinstance(why, str)):
            return None
        if not (isinstance(at, int | float) and isinstance(seconds, int | float)):
            return None
        if isinstance(at, bool) or not (math.isfinite(at) and math.isfinite(seconds)):
            return None
        return cls(checkpoint_id, verified, float(at), host[:64], _one_line(why), float(seconds))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_WHY]


def read(backend: BlobStore, codec: Codec, workload: str) -> dict[str, Mark]:
    """Checkpoint id -> its mark, for every mark of `workload` that opens and parses."""
    out: dict[str, Mark] = {}
    for key in backend.list(keys.marks_of(workload)):
        name = keys.parse_as(key, FileType.MARK)
        if name is None or name.workload != workload:
            continue
        try:
            mark = Mark.parse(codec.open(key, backend.get(key, MAX_MARK_BYTES)), name.id)
        except (BlobNotFound, CorruptCheckpoint):
            continue
        if mark is not None:
            out[name.id] = mark
    return out


def write(backend: BlobStore, codec: Codec, workload: str, mark: Mark) -> None:
    """Store `mark` for its checkpoint, replacing one that says otherwise."""
    key = mark_key(check_workload_name(workload), mark.id)
    mark = Mark(mark.id, mark.verified, mark.at, mark.host, _one_line(mark.why), mark.seconds)
    try:
        backend.put(key, codec.seal(key, mark.to_json()))
    except BlobExists:
        backend.delete(key)
        with contextlib.suppress(BlobExists):  # another writer's, just now: theirs stands
            backend.put(key, codec.seal(key, mark.to_json()))


def remove(backend: BlobStore, workload: str, checkpoint_ids: set[str]) -> None:
    """Forget the marks of checkpoints that are gone (retention removed them)."""
    for cid in sorted(checkpoint_ids):
        backend.delete(mark_key(check_workload_name(workload), cid))
