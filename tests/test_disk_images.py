"""Images kept on disk (checkpointer/engine/disk_images.py): after a reboot emptied /dev/shm the
newest checkpoint comes back from its disk image, a rollback to the one before from its own;
a damaged or cut file is refused (by its stamps in the boot that wrote it, by its digest after
a reboot) and the restore reads the repository instead, never wrong memory."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.engine.disk_images import DiskImages, file_digest
from checkpointer.engine.registry import from_json, to_json
from checkpointer.engine.workload import Workload, WorkloadKind
from storage import Repository
from storage.backends.local import LocalBlobStore
from tests.support import COUNTER, Daemon, free_port, http_get, serve
from tests.support.redis_server import redis_client, redis_command

PAGE = 4096


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    monkeypatch.setenv("CHECKPOINTER_BOOT_ID_FILE", str(path))
    return path


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_slots_hold_the_newest_images_byte_for_byte(tmp_path: Path, boot: Path) -> None:
    """Three commits into two slots: each slot is an exact copy of its checkpoint's image,
    whether copied whole or only where pages changed (a file grown, shrunk, added, dropped),
    and the oldest slot is the one overwritten."""
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "image"
    src.mkdir(mode=0o700)
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
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "image"
    src.mkdir(mode=0o700)
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
    path = image.path / "pages-1.img"
    st = os.stat(path)
    _flip(path, 20 * PAGE)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
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
        assert last["detail"].endswith("from the disk image"), last


def test_a_damaged_disk_image_after_a_reboot_is_refused_and_the_repository_restores(
    rebooting: tuple[Daemon, Path],
) -> None:
    d, boot_id = rebooting
    port = free_port()
    d.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
    serve(port, 3)
    d.checkpoint("web")
    d.stop()
    pages = sorted((d.state / "images" / "web").glob("*/pages-*.img"))
    assert pages, "no disk image written"
    for p in pages:
        st = os.stat(p)
        _flip(p, st.st_size // 2)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    d.drop_kept_images(disk=False)
    boot_id.write_text("boot-2\n")
    d.start()
    assert http_get(port, timeout=30) == "4"
    last = _last_restore(d, "web")
    assert last["result"] == "ok" and last["detail"].endswith("from the repository"), last
    assert "does not match its digest" in d.log.read_text()


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
