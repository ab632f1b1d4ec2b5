"""Restore drills: a checkpoint restored in a sandbox (real CRIU as root, on real process trees),
marked verified or bad, and what follows from the marks (retention, the restore policy, `list`,
`status`, metrics and the alert)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from checkpointer.config import Retention
from storage import marks
from storage.backends.local import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.keys import mark_key
from storage.retention import Item, decide

CID = "20261123T162319.468074Z-79b328"


# -- the marks in the repository, and retention -----------------------------------------------


def test_a_mark_is_sealed_under_its_own_name_and_a_moved_or_forged_one_marks_nothing(
    tmp_path: Path,
) -> None:
    store, codec = LocalBlobStore(tmp_path), Sealed(new_master())
    other = "20261124T000000.000000Z-aaaaaa"
    marks.write(store, codec, "web", marks.Mark(CID, True, 1.0, "a", "", 0.5))
    assert marks.read(store, codec, "web") == {CID: marks.Mark(CID, True, 1.0, "a", "", 0.5)}
    # Copied under another checkpoint's name (whoever can write the bucket): does not open.
    store.put(mark_key("web", other), store.get(mark_key("web", CID)))
    # Written in clear, or sealed with another repository's key: neither opens.
    store.put(mark_key("web", "20261125T000000.000000Z-bbbbbb"), b'{"verified": true}')
    forged = Sealed(new_master())
    key = mark_key("web", "20261126T000000.000000Z-cccccc")
    store.put(key, forged.seal(key, marks.Mark(key[-30:], True, 1.0).to_json()))
    assert set(marks.read(store, codec, "web")) == {CID}
    # A failed drill replaces the verdict, reason kept on one line.
    marks.write(store, codec, "web", marks.Mark(CID, False, 2.0, "a", "bad\nsize " * 300))
    got = marks.read(store, codec, "web")[CID]
    assert not got.verified and "\n" not in got.why and len(got.why) == marks.MAX_WHY
    marks.remove(store, "web", {CID})
    assert marks.read(store, codec, "web") == {}


def test_retention_keeps_the_newest_verified_checkpoint_besides_its_rules() -> None:
    t0 = datetime(2026, 11, 23, 12, tzinfo=UTC)
    items = [Item(f"c{i}", t0 - timedelta(hours=i), 100) for i in range(5)]
    kept = {v.id: v.reasons for v in decide(Retention(keep_last=1), items) if v.keep}
    assert kept == {"c0": ["last"]}
    verdicts = decide(Retention(keep_last=1), items, verified=frozenset({"c2", "c3"}))
    kept = {v.id: v.reasons for v in verdicts if v.keep}
    assert kept == {"c0": ["last"], "c2": ["newest verified"]}
    # max_total_bytes never removes it either.
    verdicts = decide(
        Retention(keep_last=5, max_total_bytes=100), items, verified=frozenset({"c3"})
    )
    assert {v.id for v in verdicts if v.keep} == {"c3"}
