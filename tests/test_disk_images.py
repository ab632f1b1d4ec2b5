"""Images kept on disk (checkpointer/engine/disk_images.py): after a reboot emptied /dev/shm the
newest checkpoint comes back from its disk image, a rollback to the one before from its own;
a damaged or cut file is refused (by its stamps in the boot that wrote it, by its digest after
a reboot) and the restore reads the repository instead, never wrong memory. A disk image
damaged before a reboot is caught lazily (each chunk read checked against the checkpoint's
manifest: checkpointer/engine/disk_image_files.py) or in full (each file's digest)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.engine.disk_image_files import DiskImageDamaged, DiskImageFiles
from checkpointer.engine.disk_images import DiskImages, file_digest
from checkpointer.engine.registry import from_json, to_json
from checkpointer.engine.workload import Workload, WorkloadKind
from storage import Repository
from storage.backends.local import LocalBlobStore
from storage.crypto import Sealed, new_master
from tests.support import COUNTER, Daemon, free_port, http_get, serve
from tests.support.paths import PROGRAMS
from tests.support.redis_server import redis_client, redis_command

PAGE = 4096


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    monkeypatch.setenv("CHECKPOINTER_BOOT_ID_FILE", str(path))
    return path


def _flip(path: Path, at: int, keep_stamps: bool = False) -> None:
    """One byte changed; with `keep_stamps`, under the file system (bit rot, a cut writeback):
    its mtime left as it was."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    if keep_stamps:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _repository_and_image(tmp_path: Path) -> tuple[Repository, Path]:
    """A local repository in clear and an empty image folder (0700) to commit into it."""
    src = tmp_path / "image"
    src.mkdir(mode=0o700)
    return Repository(LocalBlobStore(tmp_path / "repo")), src


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_slots_hold_the_newest_images_byte_for_byte(tmp_path: Path, boot: Path) -> None:
    """Three commits into two slots: each slot is an exact copy of its checkpoint's image,
    whether copied whole or only where pages changed (a file grown, shrunk, added, dropped),
    and the oldest slot is the one overwritten."""
    repo, src = _repository_and_image(tmp_path)
    big = bytearray(os.urandom(300 * PAGE + 123))
    (src / "pages-1.img").write_bytes(big)
    (src / "core-1.img").write_bytes(b"core one")
    disk = DiskImages(tmp_path / "state" / "images", 2)
    held = disk.store("web", [], src, m1 := repo.commit("web", src))
    assert [d.slot for d in held] == [0] and _same(src, held[0].path)
    first = tmp_path / "first"
    os.rename(src, first)
    src.mkdir(mode=0o700)
    big[5 * PAGE : 7 * PAGE] = os.urandom(2 * PAGE)
    big += os.urandom(40 * PAGE)  # grown
    (src / "pages-1.img").write_bytes(big)
    (src / "mm-1.img").write_bytes(b"new file")
    held = disk.store("web", held, src, repo.commit("web", src))
    assert sorted(d.slot for d in held) == [0, 1]
    assert _same(first, next(d for d in held if d.id == m1.id).path)
    assert _same(src, next(d for d in held if d.slot == 1).path)
    # The third overwrites slot 0 (the oldest), page by page against what it held.
    big[100 * PAGE : 101 * PAGE] = os.urandom(PAGE)
    del big[200 * PAGE :]  # shrunk
    (src / "pages-1.img").write_bytes(big)
    (src / "mm-1.img").unlink()
    held = disk.store("web", held, src, m3 := repo.commit("web", src))
    newest = next(d for d in held if d.id == m3.id)
    assert newest.slot == 0 and _same(src, newest.path) and m1.id not in {d.id for d in held}
    assert newest.digests["pages-1.img"] == file_digest(src / "pages-1.img")
    # The records survive the registry, and the slot is found again for its checkpoint.
    w = Workload("web", WorkloadKind.MANAGED, disk=held)
    again = from_json(to_json(w)).disk
    assert again == held
    assert disk.find("web", again, m3.id) == newest


def test_a_changed_file_is_refused_in_the_same_boot_and_after_a_reboot(
    tmp_path: Path, boot: Path
) -> None:
    repo, src = _repository_and_image(tmp_path)
    (src / "pages-1.img").write_bytes(os.urandom(64 * PAGE))
    disk = DiskImages(tmp_path / "images", 1)
    m = repo.commit("web", src)
    [image] = disk.store("web", [], src, m)
    # Same boot: any write changes the file's ctime, which its stamp recorded.
    _flip(image.path / "pages-1.img", 10 * PAGE)
    assert disk.find("web", [image], m.id) is None and not image.path.exists()
    # After a reboot the stamps prove nothing: the digest does. A byte flipped under the
    # file system (stamps untouched, as bit rot or a cut writeback would leave it) is caught.
    [image] = disk.store("web", [], src, m)
    boot.write_text("boot-2\n")
    _flip(image.path / "pages-1.img", 20 * PAGE, keep_stamps=True)
    assert disk.find("web", [image], m.id) is None
    # Intact after a reboot: found, checked once, then trusted for this boot.
    [image] = disk.store("web", [], src, m)
    boot.write_text("boot-3\n")
    assert disk.find("web", [image], m.id) == image
    assert disk.revalidated(image).boot == "boot-3"


@pytest.fixture
def rebooting(workdir: Path) -> Iterator[tuple[Daemon, Path]]:
    boot_id = workdir / "boot_id"
    boot_id.write_text("boot-1\n")
    d = Daemon(workdir)
    d.env["CHECKPOINTER_BOOT_ID_FILE"] = str(boot_id)
    try:
        d.start()
        yield d, boot_id
    finally:
        d.stop()


def _reboot(d: Daemon, boot_id: Path, n: int) -> None:
    d.stop()  # the daemon stops, then every workload dies: as in a power cut
    d.drop_kept_images(disk=False)  # /dev/shm is emptied; the disk is not
    boot_id.write_text(f"boot-{n}\n")
    os.sync()  # and the page cache with it: the disk images are read from the disk
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    d.start()


def _last_restore(d: Daemon, name: str) -> dict[str, str]:
    st = d.wait_for(name, lambda s: s["restores"] and s["state"] == "running")
    return st["restores"][-1]  # type: ignore[no-any-return]


def test_after_a_reboot_the_counter_and_redis_come_back_from_their_disk_images(
    rebooting: tuple[Daemon, Path],
) -> None:
    d, boot_id = rebooting
    web, cache = free_port(), free_port()
    d.cli("run", "web", "--", sys.executable, str(COUNTER), str(web))
    d.cli("run", "cache", "--", *redis_command(cache))
    client = redis_client(cache)
    client.mset({f"key:{i}": f"value {i}" * 20 for i in range(20000)})
    client.close()
    serve(web, 4)
    for name in ("web", "cache"):
        d.checkpoint(name)
    serve(web, 2)
    _reboot(d, boot_id, 2)
    assert http_get(web, timeout=30) == "5"
    client = redis_client(cache, timeout=30)
    keys = [f"key:{i}" for i in range(20000)]
    assert client.mget(keys) == [f"value {i}".encode() * 20 for i in range(20000)]
    client.close()
    for name in ("web", "cache"):
        last = _last_restore(d, name)
        assert last["reason"] == "boot" and last["result"] == "ok"
        # Lazily, each page checked as it is read (restore.lazy_after_reboot, the default).
        assert last["detail"].endswith(
            "from the disk image, lazily (pages on demand, each checked)"
        ), last


def test_rollback_to_the_previous_checkpoint_reads_its_disk_image(
    counter: tuple[Daemon, int],
) -> None:
    d, port = counter
    serve(port, 2)  # 3
    first = d.checkpoint("web")
    serve(port, 3)  # 6
    d.checkpoint("web")
    r = d.json("rollback", "web", "--to", first)
    assert r["source"] == "disk image", r
    assert http_get(port) == "4"  # the older count, one more
    # A write into the slots (same boot): their stamps no longer match, the rollback rebuilds.
    for p in (d.state / "images" / "web").glob("*/pages-*.img"):
        _flip(p, os.stat(p).st_size // 2)
    r = d.json("rollback", "web", "--to", first)
    assert r["source"] == "repository", r
    assert http_get(port) == "4"


# -- lazily after a reboot: each chunk read is checked against the manifest --------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "encrypted"])
def test_the_reader_returns_exact_ranges_and_refuses_a_changed_chunk(
    tmp_path: Path, boot: Path, sealed: bool
) -> None:
    codec = Sealed(new_master()) if sealed else None
    repo = Repository(LocalBlobStore(tmp_path / "repo"), codec=codec)
    src = tmp_path / "image"
    src.mkdir(mode=0o700)
    data = os.urandom(50 * PAGE + 777)  # a short last chunk
    (src / "pages-1.img").write_bytes(data)
    (src / "core-1.img").write_bytes(b"core")
    m = repo.commit("web", src)
    [image] = DiskImages(tmp_path / "images", 1).store("web", [], src, m)
    files = DiskImageFiles(repo, "web", m.id, image.path)
    try:
        for offset, length in ((0, PAGE), (3 * PAGE + 5, 2 * PAGE), (49 * PAGE, 10 * PAGE)):
            assert files.read("pages-1.img", offset, length) == data[offset : offset + length]
        assert files.read("core-1.img", 0, 100) == b"core"
        _flip(image.path / "pages-1.img", 20 * PAGE + 9, keep_stamps=True)
        assert files.read("pages-1.img", 0, 20 * PAGE) == data[: 20 * PAGE]  # not that chunk
        with pytest.raises(DiskImageDamaged, match="chunk 20 does not match"):
            files.read("pages-1.img", 18 * PAGE, 4 * PAGE)
        os.truncate(image.path / "core-1.img", 2)
        with pytest.raises(DiskImageDamaged, match="shorter"):
            files.read("core-1.img", 0, 4)
        with pytest.raises(DiskImageDamaged, match="no file"):
            files.read("pages-9.img", 0, PAGE)
    finally:
        files.close()


def test_a_checkpoint_never_overwrites_the_slot_a_lazy_restore_reads(
    tmp_path: Path, boot: Path
) -> None:
    repo, src = _repository_and_image(tmp_path)
    (src / "pages-1.img").write_bytes(os.urandom(8 * PAGE))
    two = DiskImages(tmp_path / "two", 2)
    held = two.store("web", [], src, repo.commit("web", src))
    held = two.store("web", held, src, repo.commit("web", src))
    oldest = min(held, key=lambda d: d.id)
    # The oldest slot would be overwritten next; a lazy restore reads it: the other one goes.
    held = two.store("web", held, src, m3 := repo.commit("web", src), busy=oldest.slot)
    assert oldest in held and next(d for d in held if d.id == m3.id).slot != oldest.slot
    one = DiskImages(tmp_path / "one", 1)
    [only] = one.store("web", [], src, repo.commit("web", src))
    # One slot, being read: the checkpoint is written nowhere, the slot keeps its image.
    assert one.store("web", [only], src, repo.commit("web", src), busy=only.slot) == [only]
    assert one.find("web", [only], only.id) == only
    # After a reboot, the slot is handed to a lazy restore unhashed; in its own boot it is not.
    assert one.after_reboot("web", [only], only.id) is None
    boot.write_text("boot-2\n")
    assert one.after_reboot("web", [only], only.id) == only


def _ballast_daemon(workdir: Path, port: int, lazy_after_reboot: bool) -> Daemon:
    d = Daemon(
        workdir,
        f"""
workloads:
  - name: web
    command: [{sys.executable}, {PROGRAMS / "ballast_server.py"}, "{port}", "64"]
    restore: {{lazy_after_reboot: {str(lazy_after_reboot).lower()}}}
""",
    )
    d.env["CHECKPOINTER_BOOT_ID_FILE"] = str(workdir / "boot_id")
    (workdir / "boot_id").write_text("boot-1\n")
    return d


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "full"])
def test_a_disk_image_damaged_before_a_reboot_never_reaches_the_tree(
    workdir: Path, lazy: bool
) -> None:
    """A byte flipped in the middle of every pages file of the disk image (stamps untouched):
    lazily, the page check kills the tree (or refuses the image before it runs); in full, the
    whole-file digest refuses it. Either way the repository's copy comes back, count intact."""
    port = free_port()
    d = _ballast_daemon(workdir, port, lazy)
    try:
        d.start()
        assert serve(port, 3) == "3"
        d.checkpoint("web")
        d.stop()
        pages = sorted((d.state / "images" / "web").glob("*/pages-*.img"))
        assert pages, "no disk image written"
        for p in pages:
            _flip(p, os.stat(p).st_size // 2, keep_stamps=True)
        d.drop_kept_images(disk=False)
        (workdir / "boot_id").write_text("boot-2\n")
        d.start()
        st = d.wait_for(
            "web",
            lambda s: (
                s["state"] == "running"
                and any(r["detail"].endswith("from the repository") for r in s["restores"])
            ),
            timeout=90,
        )
        assert http_get(port, timeout=30) == "4"
        log = d.log.read_text()
        details = [r["detail"] for r in st["restores"]]
        if lazy:
            assert "does not match the checkpoint's manifest" in log
            # The tree ran from the disk image until the damaged page was read (or the image
            # was refused before it ran); the checkpoint was never marked bad.
            assert any("disk image, lazily" in t for t in details) or "unusable" in log, details
            assert not any("marked bad" in t for t in details), details
        else:
            assert "does not match its digest" in log
    finally:
        d.stop()


def test_slots_past_criu_disk_images_are_dropped_and_a_planted_fifo_is_refused(
    tmp_path: Path, boot: Path
) -> None:
    """`criu.disk_images` lowered (0: the disk must hold no process memory): a slot past it
    is never restored from, and is deleted when looked up. A FIFO planted in a slot is
    refused at once after a reboot (its digest was opened blocking: it waited for a writer)."""
    repo, src = _repository_and_image(tmp_path)
    (src / "pages-1.img").write_bytes(os.urandom(8 * PAGE))
    [image] = DiskImages(tmp_path / "images", 1).store("web", [], src, m := repo.commit("web", src))
    boot.write_text("boot-2\n")
    none = DiskImages(tmp_path / "images", 0)
    assert none.after_reboot("web", [image], m.id) is None
    assert none.find("web", [image], m.id) is None and not image.path.exists()
    [image] = DiskImages(tmp_path / "images", 1).store("web", [], src, m)
    boot.write_text("boot-3\n")
    (image.path / "pages-1.img").unlink()
    os.mkfifo(image.path / "pages-1.img", 0o600)
    assert DiskImages(tmp_path / "images", 1).find("web", [image], m.id) is None


def test_a_checkpoint_after_criu_disk_images_was_lowered_deletes_the_slots_past_it(
    tmp_path: Path, boot: Path
) -> None:
    """Was: the next checkpoint dropped the records of the slots past `criu.disk_images` and
    left their folders: a whole image of the process's memory on disk, unencrypted, that no
    record named any more (never restored from, never deleted, its space never freed)."""
    repo, src = _repository_and_image(tmp_path)
    held = []
    for _ in range(2):
        (src / "pages-1.img").write_bytes(os.urandom(8 * PAGE))
        held = DiskImages(tmp_path / "images", 2).store("web", held, src, repo.commit("web", src))
    assert sorted(d.slot for d in held) == [0, 1]
    (src / "pages-1.img").write_bytes(os.urandom(8 * PAGE))
    newer = repo.commit("web", src)
    held = DiskImages(tmp_path / "images", 1).store("web", held, src, newer)
    assert [(d.slot, d.id) for d in held] == [(0, newer.id)]
    assert sorted(p.name for p in (tmp_path / "images" / "web").iterdir()) == ["0", "0.pages"]
    assert DiskImages(tmp_path / "images", 0).prune("web", held) == []
    assert list((tmp_path / "images" / "web").iterdir()) == []


def test_a_daemon_started_with_fewer_disk_images_deletes_the_slots_past_them(
    workdir: Path,
) -> None:
    """`criu.disk_images: 0` (no process memory on this disk) takes effect at the daemon's
    start, for every workload, not only at its next checkpoint (a stopped one has none)."""
    port = free_port()
    d = Daemon(workdir)
    try:
        d.start()
        d.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        serve(port, 2)
        d.checkpoint("web")
        slots = d.state / "images" / "web"
        assert any(slots.glob("*/pages-*.img")), "no disk image written"
        pid = d.pid("web")
        d.terminate()  # the tree runs on and is re-adopted: nothing restores it
        d.config.write_text(d.config.read_text() + "criu:\n  disk_images: 0\n")
        d.start()
        assert d.wait_for("web", lambda s: s["state"] == "running")["pid"] == pid
        assert not any(slots.glob("*/*.img")), sorted(slots.rglob("*"))
    finally:
        d.stop()
