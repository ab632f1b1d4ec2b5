"""Storage reads the time only through the clock it is given (storage/clock.py): a
repository on another clock names its checkpoints and packs by that clock, and its garbage
collection measures the grace by it, so a simulation runs the real code on a virtual clock
without patching (bench/fleet_scale.py); a retrying store waits its backoff through the
`sleep` it is given."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from storage import Repository
from storage.backends.local import LocalBlobStore
from storage.backends.retrying import RetryingBlobStore
from storage.clock import Clock
from storage.errors import TransientStorageError
from storage.gc import collect_garbage
from storage.packs import pack_created

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

FUTURE = 2_000_000_000.0  # 2033-05-18T03:33:20Z


class Hands:
    """A clock that moves only when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def clock(self) -> Clock:
        return Clock(wall=lambda: self.now, monotonic=lambda: self.now)


def image(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "pages-1.img").write_bytes(random.Random(seed).randbytes(64 * 1024))
    return folder


def test_a_repository_names_and_collects_by_the_clock_it_is_given(tmp_path: Path) -> None:
    hands = Hands(FUTURE)
    repo = Repository(LocalBlobStore(tmp_path / "repo"), gc_grace=600.0, clock=hands.clock())
    old = repo.commit("w", image(tmp_path / "1", 1))
    assert old.id.startswith("20330518T033320.")
    assert old.created.timestamp() == FUTURE
    assert {pack_created(p) for p in old.packs} == {FUTURE}
    repo.commit("w", image(tmp_path / "2", 2))
    repo.delete("w", old.id)
    hands.now += 599.0  # within the grace on this clock (the real one is years before)
    assert collect_garbage(repo, ["w"]).deleted_packs == []
    hands.now += 2.0
    assert sorted(collect_garbage(repo, ["w"]).deleted_packs) == sorted(old.packs)


def test_a_retrying_store_waits_through_the_sleep_it_is_given(tmp_path: Path) -> None:
    waited: list[float] = []
    store = RetryingBlobStore(LocalBlobStore(tmp_path), attempts=3, sleep=waited.append)

    def flaky() -> None:
        raise TransientStorageError("503 SlowDown")

    with pytest.raises(TransientStorageError):
        store.around("get", flaky)
    assert len(waited) == 2 and all(w > 0 for w in waited)
