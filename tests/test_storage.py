"""The repository on the local-folder backend: round trip, dedup, crash safety, corruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storage import CheckpointNotFound, CorruptCheckpoint, Repository
from storage.backends import LocalBlobStore
from storage.gc import collect_garbage
from storage.rebuild import WantedChunks
from storage.repository import CHUNK_SIZE

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def make_folder(path: Path, sizes: dict[str, int]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (path / name).write_bytes(os.urandom(size))
    return path


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture
def repo(workdir: Path) -> Repository:
    return Repository(LocalBlobStore(workdir / "repo"))


def test_round_trip_is_byte_identical(repo: Repository, workdir: Path) -> None:
    src = make_folder(
        workdir / "src",
        {
            "pages-1.img": 5 * CHUNK_SIZE + 17,
            "core-1.img": 300,
            "empty.img": 0,
            "big.img": 3 * 1024 * 1024,
        },
    )
    m = repo.commit("w", src, {"note": "x"})
    out = workdir / "out"
    repo.materialize("w", m.id, out)
    assert same_files(src, out)
    assert (out.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o077) == 0 for p in out.iterdir())
    assert repo.checkpoints("w")[0].metadata == {"note": "x"}


def test_second_checkpoint_stores_only_changed_pages(repo: Repository, workdir: Path) -> None:
    src = make_folder(workdir / "src", {"pages-1.img": 8 * 1024 * 1024})
    first = repo.commit("w", src)
    assert first.new_bytes > 8 * 1024 * 1024 * 0.99  # random data barely compresses
    # Rewrite 20 scattered pages: only those should be stored again.
    with open(src / "pages-1.img", "r+b") as f:
        for i in range(20):
            f.seek(i * 97 * CHUNK_SIZE)
            f.write(os.urandom(CHUNK_SIZE))
    second = repo.commit("w", src)
    assert second.new_chunks == 20
    assert second.new_bytes < 21 * CHUNK_SIZE + 1024
    out = workdir / "out"
    repo.materialize("w", second.id, out)
    assert same_files(src, out)
    assert [c.id for c in repo.checkpoints("w")] == [second.id, first.id]


def test_repeated_chunks_across_files_and_packs_are_restored_everywhere(
    repo: Repository, workdir: Path
) -> None:
    """Zero pages and shared pages appear many times in an image and across files; packs are
    4 MiB, so a 20 MiB image spans several, and the second checkpoint mixes old and new packs."""
    page = os.urandom(CHUNK_SIZE)
    src = workdir / "src"
    src.mkdir()
    body = bytearray(os.urandom(20 * 1024 * 1024))
    for i in range(0, len(body), 37 * CHUNK_SIZE):
        body[i : i + CHUNK_SIZE] = bytes(CHUNK_SIZE) if i // (37 * CHUNK_SIZE) % 2 else page
    (src / "pages-1.img").write_bytes(body)
    (src / "pages-2.img").write_bytes(page * 3 + bytes(CHUNK_SIZE) * 5 + b"tail")
    first = repo.commit("w", src)
    assert len(first.packs) >= 3
    distinct = {
        bytes(data[o : o + CHUNK_SIZE])
        for data in ((src / "pages-1.img").read_bytes(), (src / "pages-2.img").read_bytes())
        for o in range(0, len(data), CHUNK_SIZE)
    }
    assert first.new_chunks == len(distinct)  # each repeated page stored once
    with open(src / "pages-1.img", "r+b") as f:
        f.seek(5 * 1024 * 1024)
        f.write(page * 10 + os.urandom(CHUNK_SIZE * 10))
    second = repo.commit("w", src)
    assert second.new_chunks == 10
    for m in (first, second):
        out = workdir / f"out-{m.id}"
        repo.materialize("w", m.id, out)
        if m is second:
            assert same_files(src, out)
    out_first = (workdir / f"out-{first.id}" / "pages-1.img").read_bytes()
    assert out_first == bytes(body)


def test_flipped_byte_in_a_chunk_fails_restore_naming_the_checkpoint(
    repo: Repository, workdir: Path
) -> None:
    src = make_folder(workdir / "src", {"pages-1.img": 64 * CHUNK_SIZE})
    m = repo.commit("w", src)
    pack = next((workdir / "repo" / "wpacks" / "w").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(pack, 0o600)
    pack.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as err:
        repo.materialize("w", m.id, workdir / "out")
    assert m.id in str(err.value) and "corrupt" in str(err.value)


@pytest.mark.parametrize("at", range(4, 9))
def test_damaged_frame_header_fails_restore_as_corrupt(
    repo: Repository, workdir: Path, at: int
) -> None:
    """A frame header claiming any content size: a clear error, never a huge allocation.
    (Compressible pages: random ones are stored raw, with no frame header.)"""
    src = workdir / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(4 * CHUNK_SIZE).hex().encode())
    m = repo.commit("w", src)
    pack = next((workdir / "repo" / "wpacks" / "w").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[at] = 0xFF  # the first frame's header: descriptor, window, content size
    os.chmod(pack, 0o600)
    pack.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as err:
        repo.materialize("w", m.id, workdir / "out")
    assert m.id in str(err.value)


def test_missing_pack_fails_restore_clearly(repo: Repository, workdir: Path) -> None:
    m = repo.commit("w", make_folder(workdir / "src", {"a": 10000}))
    next((workdir / "repo" / "wpacks" / "w").rglob("*.pack")).unlink()
    with pytest.raises(CorruptCheckpoint, match="missing"):
        repo.materialize("w", m.id, workdir / "out")


def test_unknown_checkpoint_and_bad_names(repo: Repository, workdir: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        repo.read_manifest("w", "20260101T000000.000000Z-abcdef")
    with pytest.raises(CheckpointNotFound):
        repo.read_manifest("w", "../../etc/passwd")
    with pytest.raises(ValueError):
        repo.commit("../evil", workdir)
    assert repo.checkpoints("nothing") == []


def test_delete_removes_only_that_checkpoint(repo: Repository, workdir: Path) -> None:
    src = make_folder(workdir / "src", {"a": 50000})
    a = repo.commit("w", src)
    b = repo.commit("w", src)
    repo.delete("w", a.id)
    assert [c.id for c in repo.checkpoints("w")] == [b.id]
    repo.materialize("w", b.id, workdir / "out")  # shared chunks are still there
    assert same_files(src, workdir / "out")


WRITER = """
import sys
from pathlib import Path
from storage import Repository
from storage.backends import LocalBlobStore
Repository(LocalBlobStore(Path(sys.argv[1]))).commit("w", Path(sys.argv[2]))
print("committed", flush=True)
"""


def test_writer_killed_mid_checkpoint_leaves_no_visible_checkpoint(workdir: Path) -> None:
    src = make_folder(workdir / "src", {f"pages-{i}.img": 32 * 1024 * 1024 for i in range(8)})
    store = workdir / "repo"
    packs = store / "wpacks" / "w"  # the workload's own prefix (storage/keys.py)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), str(src)], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not list(packs.rglob("*.idx")) if packs.exists() else True:
            assert proc.poll() is None, "the writer finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
    assert "committed" not in out  # it really died mid-checkpoint, packs written
    repo = Repository(LocalBlobStore(store))
    assert repo.checkpoints("w") == []
    # The repository is still usable. (The orphaned packs are not reused: a commit dedups only
    # against its workload's committed checkpoints, storage/dedup_index.py; GC collects them.)
    m = repo.commit("w", src)
    repo.materialize("w", m.id, workdir / "out")
    assert same_files(src, workdir / "out")
    orphans = {p.stem for p in packs.rglob("*.pack")} - set(m.packs)
    assert orphans and collect_garbage(repo, ["w"], grace=0).deleted_packs == sorted(orphans)


class CountingStore(LocalBlobStore):
    """The local backend, counting the packs read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.packs_read = 0

    def get(self, key: str, limit: int | None = None) -> bytes:
        if key.endswith(".pack"):
            self.packs_read += 1
        return super().get(key, limit)

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        if key.endswith(".pack"):
            self.packs_read += 1
        return super().get_into(key, buffer, limit)


def test_older_checkpoint_is_rebuilt_from_the_newer_folder_where_they_share_pages(
    workdir: Path,
) -> None:
    store = CountingStore(workdir / "repo")
    repo = Repository(store)
    page = os.urandom(CHUNK_SIZE)
    src = make_folder(workdir / "src", {"pages-1.img": 24 * 1024 * 1024, "core-1.img": 1000})
    with open(src / "pages-1.img", "r+b") as f:  # zero pages and repeats, as in real images
        for i in range(0, 24 * 1024 * 1024, 50 * CHUNK_SIZE):
            f.seek(i)
            f.write(bytes(CHUNK_SIZE) if i % 3 else page)
    older = repo.commit("w", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with open(src / "pages-1.img", "r+b") as f:  # 10 pages change, near the start
        for i in range(10):
            f.seek((100 + 7 * i) * CHUNK_SIZE)
            f.write(os.urandom(CHUNK_SIZE))
    (src / "core-1.img").write_bytes(os.urandom(1200))
    newer = repo.commit("w", src)
    out = workdir / "out"
    store.packs_read = 0
    done: list[int] = []
    repo.materialize("w", older.id, out, done.append, seed=(newer.id, src))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sum(done) == sum(len(b) for b in before.values())
    # Only the pack holding the 11 chunks the newer folder lacks was read, not all 6.
    assert len(older.packs) >= 6
    assert store.packs_read == 1


def test_pack_downloads_stay_in_flight_while_packs_are_decoded(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a bucket, a restore keeps `concurrency` pack fetches going while a pack is decoded
    (a thread that has its pack gives its fetching slot up before it waits for a core), so the
    decoding never leaves the link idle. Slow fetches and a slow decode on one core show it."""

    class SlowStore(LocalBlobStore):
        in_flight = 0
        lock = threading.Lock()

        def get_into(
            self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
        ) -> bytes | memoryview:
            with self.lock:
                self.in_flight += 1
            try:
                time.sleep(0.3)  # a link much slower than the decoding, even on a loaded machine
                return super().get_into(key, buffer, limit)
            finally:
                with self.lock:
                    self.in_flight -= 1

    store = SlowStore(workdir / "repo")
    in_flight_at_decode: list[int] = []
    write_pack = WantedChunks.write_pack

    def slow_write_pack(self: WantedChunks, *args: Any) -> int:
        # The most fetches seen in flight while this pack decodes, watched over the decode (one
        # look at its start and end missed them on a loaded machine: the fetching threads had
        # not been scheduled yet). A decode that kept its fetching slot never sees 3.
        seen = store.in_flight
        until = time.monotonic() + 0.02
        while time.monotonic() < until:
            seen = max(seen, store.in_flight)
            time.sleep(0.002)
        in_flight_at_decode.append(seen)
        return write_pack(self, *args)

    repo = Repository(store, concurrency=3)
    src = make_folder(workdir / "src", {"pages-1.img": 40 * 1024 * 1024})
    m = repo.commit("w", src)
    monkeypatch.setattr(WantedChunks, "write_pack", slow_write_pack)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    repo.materialize("w", m.id, workdir / "out")
    assert same_files(src, workdir / "out")
    assert len(in_flight_at_decode) >= 8  # one per pack
    assert max(in_flight_at_decode) == 3, in_flight_at_decode
