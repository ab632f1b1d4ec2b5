"""The grace of a checkpoint retention dropped from its workload's head (docs/fleet.md, R4):
its manifest is deleted by the owner's hourly job (`Repository.tidy`) no sooner than the
grace after the owner saw it dropped, so a reader who read the head (or pinned it) within the
grace still finds it. Found by a review (findings 3, 4, 5); each test failed before the fix:
- a checkpoint named again (pinned in time) and dropped again kept its first drop's time, and
  was deleted 10 minutes after its second drop;
- an owner that lost the workload meanwhile (another host fenced a newer generation) still
  deleted, on its stale times, what the new owner had named again and dropped just now;
- the head remembered at most MAX_DROPPED dropped ids: one that fell off, pinned later, was
  deleted as a stray.

Two hosts' repositories over one local store, on a clock that moves only when told (the
grace is hours): the repository's own code, heads, pins and the owner's job."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from checkpointer.engine.events import Silent
from checkpointer.engine.maintenance import Maintenance
from storage import Repository
from storage import fencing as fencing_module
from storage.backends.local import LocalBlobStore
from storage.clock import Clock
from storage.crypto import Sealed, new_master
from storage.fencing import NotFenced
from storage.heads import Fenced, Heads
from storage.keys import manifest_key

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

GRACE = 6 * 3600.0
START = 2_000_000_000.0  # 2033-05-18T03:33:20Z


class Fleet:
    """One bucket (a local folder), two hosts' repositories on one hand-moved clock."""

    def __init__(self, bucket: Path) -> None:
        self.bucket = bucket
        self.key = new_master()
        self.now = START
        self.a, self.b = self.host(), self.host()

    def host(self) -> Repository:
        store = LocalBlobStore(self.bucket)  # each its own: a store applies one host's records
        clock = Clock(wall=lambda: self.now, monotonic=lambda: self.now)
        return Repository(store, gc_grace=GRACE, heads=Heads(store, Sealed(self.key)), clock=clock)

    def exists(self, checkpoint_id: str) -> bool:
        return self.a.backend.exists(manifest_key("w", checkpoint_id))


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "bucket")


def commits(fleet: Fleet, repo: Repository, n: int, tmp_path: Path) -> list[str]:
    out = []
    for i in range(n):
        folder = tmp_path / str(i)
        folder.mkdir(parents=True)
        (folder / "pages-1.img").write_bytes(random.Random(fleet.now).randbytes(8192))
        out.append(repo.commit("w", folder).id)
        fleet.now += 1.0
    return out


def test_a_checkpoint_named_again_then_dropped_again_waits_a_whole_grace(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.a.fence("w", 1)
    c = commits(fleet, fleet.a, 3, tmp_path / "i")
    fleet.a.retire("w", {c[0]})  # dropped at T1
    fleet.now += GRACE - 60
    fleet.b.pin("w", c[0])  # pinned elsewhere within the grace: named again
    assert fleet.a.tidy("w").rescued == [c[0]]
    assert c[0] in [i.id for i in fleet.b.checkpoints("w")]
    fleet.b.unpin("w", c[0])
    fleet.now += 120
    fleet.a.retire("w", {c[0]})  # dropped again at T1 + 6h01
    fleet.now += 600
    assert fleet.a.tidy("w").deleted == []  # before the fix: deleted 10 min after the drop
    assert fleet.exists(c[0])
    fleet.now += GRACE
    assert fleet.a.tidy("w").deleted == [c[0]]
    assert not fleet.exists(c[0])


def test_an_owner_that_lost_the_workload_meanwhile_deletes_nothing_on_its_old_times(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.a.fence("w", 1)
    c = commits(fleet, fleet.a, 3, tmp_path / "i")
    fleet.a.retire("w", {c[0]})  # a's grace of c0 starts at T1
    fleet.now += 3600
    fleet.b.fence("w", 2)  # b takes the workload over (a paused: it never noticed)
    fleet.b.pin("w", c[0])
    assert fleet.b.tidy("w").rescued == [c[0]]  # named again by the new owner
    fleet.now += GRACE
    # a resumes; its hourly job fires before it notices the lost lease: refused, nothing gone
    with pytest.raises(Fenced):
        fleet.a.tidy("w")
    job = Maintenance(fleet.a, Silent(), None, 1 << 40, owned=lambda: ["w"])
    job.collect_garbage()  # the engine's hourly job: logged, and a forgets what it knew of w
    assert all(fleet.exists(i) for i in c)
    with pytest.raises(NotFenced):
        fleet.a.tidy("w")
    fleet.b.unpin("w", c[0])
    fleet.b.retire("w", {c[0]})  # dropped again by b at T1 + 7h
    fleet.now += 60
    # a takes it back (generation 3): its times from generation 1 count no more
    fleet.a.fence("w", 3)
    assert fleet.a.tidy("w").deleted == []
    assert fleet.exists(c[0]) and all(fleet.exists(i) for i in c)
    fleet.now += GRACE
    assert fleet.a.tidy("w").deleted == [c[0]]


def test_a_host_that_gave_the_workload_up_forgets_its_generation_and_retention(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.a.fence("w", 1)
    fleet.a.plan_with("w", lambda chain: set(chain[:-1]))  # keep the newest only
    c = commits(fleet, fleet.a, 2, tmp_path / "i")
    assert [i.id for i in fleet.a.checkpoints("w")] == [c[1]]
    fleet.a.disown("w")  # the engine's lease-loss hook, and release
    with pytest.raises(NotFenced):
        fleet.a.tidy("w")
    with pytest.raises(NotFenced):
        fleet.a.retire("w", {c[1]})
    fleet.a.fence("w", 2)  # back again: no planner until the engine registers one
    c += commits(fleet, fleet.a, 1, tmp_path / "j")
    assert sorted(i.id for i in fleet.a.checkpoints("w")) == c[1:]


def test_a_dropped_checkpoint_stays_remembered_until_deleted_and_the_list_stays_bounded(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fencing_module, "MAX_DROPPED", 3)
    fleet.a.fence("w", 1)
    c = commits(fleet, fleet.a, 6, tmp_path / "i")
    for cid in c[:5]:  # the owner's job does not run for hours meanwhile
        fleet.a.retire("w", {cid})
        fleet.now += 600
    head = fleet.a.fencing.heads.read("w")  # type: ignore[union-attr]
    assert head is not None
    assert head[0].dropped == tuple(c[:3])  # bounded: c3 and c4 stay named for now
    assert head[0].chain == tuple(c[3:])
    fleet.b.pin("w", c[0])  # the oldest dropped, pinned late
    fleet.now += GRACE
    done = fleet.a.tidy("w")  # before the fix c0 had fallen off the list: a stray, deleted
    assert done.rescued == [c[0]] and done.deleted == c[1:3]
    assert fleet.exists(c[0]) and c[0] in [i.id for i in fleet.b.checkpoints("w")]
    fleet.a.retire("w", {c[3], c[4]})  # room again: the deleted ones are forgotten
    head = fleet.a.fencing.heads.read("w")  # type: ignore[union-attr]
    assert head is not None
    assert head[0].dropped == (c[3], c[4]) and head[0].chain == (c[0], c[5])
