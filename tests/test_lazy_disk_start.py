"""The start of a lazy restore from a disk image after a reboot (engine/lazy_restoring.py
`start` with `disk`), its CRIU half replaced by a stand-in: what the engine does around it.
A restore CRIU refused holds no descriptor of the disk image afterwards (the retries of a
port still taken would pile them up, and the slot's deleted files would keep their disk
space); a transfer that ends before `start` returns frees the slot it read for the next
checkpoint. The disk image, the manifest and the repository are real."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from checkpointer.criu import CriuError
from checkpointer.engine import Workload, WorkloadKind, lazy_restoring
from checkpointer.engine.disk_image_files import DiskImageDamaged, DiskImageFiles
from checkpointer.engine.disk_images import DiskImage, DiskImages
from checkpointer.engine.scratch import Scratch
from storage import Repository
from storage.backends import LocalBlobStore
from storage.manifest import Manifest

PAGE = 4096


class StandIn:
    """LazyRestore's surface as `start` uses it: `run` either raises what CRIU raised, or
    delivers every page at once and calls `on_finish` before it returns (a small tree whose
    background transfer ended while `criu restore` finished)."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.pid: int | None = None
        self.host_fault: str | None = None
        self.restore_stats = None
        self.started_in = (0.0, 0.0)
        self._done = False
        self.cancelled = False

    def run(
        self,
        index: object,
        source: lazy_restoring.RepositoryPages,
        opts: object,
        *,
        inherit: object = (),
        on_finish: Callable[[Any], None] | None = None,
    ) -> None:
        source.read(1, 0, 1)  # the page server reads the pages file
        if self.fail:
            raise CriuError("criu restore failed: Address already in use")
        self.pid, self._done = os.getpid(), True
        assert on_finish is not None
        on_finish(self)

    def cancel(self) -> None:
        self.cancelled = True

    def done(self) -> bool:
        return self._done

    def stats(self) -> None:
        return None


class Parts:
    def __init__(self, tmp: Path, repo: Repository) -> None:
        self.scratch = Scratch(tmp / "state", tmp / "scratch")
        self.repo = repo
        self.criu = None

    def log_fds(self, w: Workload, checkpoint_id: str) -> list[tuple[int, str]]:
        return []


@pytest.fixture
def disk_image(tmp_path: Path) -> tuple[Repository, Manifest, DiskImage]:
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "image"
    src.mkdir(mode=0o700)
    for name in ("inventory.img", "pstree.img", "core-1.img", "pagemap-1.img"):
        (src / name).write_bytes(os.urandom(300))
    (src / "pages-1.img").write_bytes(os.urandom(16 * PAGE))
    m = repo.commit("web", src)
    [image] = DiskImages(tmp_path / "images", 1).store("web", [], src, m)
    return repo, m, image


def _open_in(folder: Path) -> list[str]:
    """What this process holds open inside `folder`."""
    fds = Path("/proc/self/fd")
    held = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:
            continue
        if target.startswith(f"{folder}/"):
            held.append(target)
    return held


def _start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    disk_image: tuple[Repository, Manifest, DiskImage],
    stand_in: StandIn,
) -> Workload:
    repo, m, image = disk_image
    monkeypatch.setattr(lazy_restoring.LazyRestore, "begin", lambda *a, **k: stand_in)
    monkeypatch.setattr(
        lazy_restoring,
        "prepare_restore_dir",
        lambda images, source: SimpleNamespace(lazy_pages=16, local_pages=0),
    )
    w = Workload(name="web", kind=WorkloadKind.MANAGED)
    w.disk = [image]
    lazy_restoring.start(Parts(tmp_path, repo), w, m.id, disk=image)  # type: ignore[arg-type]
    return w


def test_a_lazy_restore_criu_refused_leaves_no_descriptor_of_the_disk_image(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    disk_image: tuple[Repository, Manifest, DiskImage],
) -> None:
    """Was: every file of the slot stayed open after each refused attempt (`run` raised after
    the point where `start` stops closing them, and `on_finish` never runs then)."""
    _, _, image = disk_image
    for _attempt in range(3):  # a port still taken: the policy tries again and again
        with pytest.raises(CriuError):
            _start(tmp_path, monkeypatch, disk_image, StandIn(fail=True))
    assert _open_in(image.path) == []


def test_a_transfer_that_ended_before_start_returned_frees_the_slot_it_read(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    disk_image: tuple[Repository, Manifest, DiskImage],
) -> None:
    """Was: `on_finish` found no transfer recorded yet, `start` then recorded one that had
    ended, and it stayed: with `criu.disk_images: 1` no checkpoint wrote a disk image again
    until the daemon restarted."""
    repo, _, image = disk_image
    w = _start(tmp_path, monkeypatch, disk_image, StandIn(fail=False))
    assert _open_in(image.path) == []
    busy = None if w.lazy is None else w.lazy.reading_slot
    src = tmp_path / "image"
    (src / "pages-1.img").write_bytes(os.urandom(16 * PAGE))
    newer = repo.commit("web", src)
    held = DiskImages(tmp_path / "images", 1).store("web", w.disk, src, newer, busy)
    assert [d.id for d in held] == [newer.id]


def test_a_fifo_planted_in_the_slot_is_refused_at_once(
    tmp_path: Path, disk_image: tuple[Repository, Manifest, DiskImage]
) -> None:
    """Was: opening it waited for a writer forever, under the workload's lock when it is one
    of the small images `start` reads (every later operation on the workload then waited)."""
    repo, m, image = disk_image
    (image.path / "core-1.img").unlink()
    os.mkfifo(image.path / "core-1.img", 0o600)
    files = DiskImageFiles(repo, "web", m.id, image.path)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(files.read("core-1.img", 0, 300))
        except BaseException as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    try:
        assert outcome, "the read still waits on the FIFO"
        assert isinstance(outcome[0], DiskImageDamaged) and "not a regular file" in str(outcome[0])
    finally:
        if reader.is_alive():  # let it go: a writer opens the FIFO
            os.close(os.open(image.path / "core-1.img", os.O_WRONLY))
            reader.join(5)
        files.close()
