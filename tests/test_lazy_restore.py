"""Lazy restores through the daemon (`restore.lazy`): the counter and a 200 MB Redis restored
from the repository with their memory fetched on demand, and a pack damaged in the middle of
a transfer: the tree is killed, never left on wrong memory, and the restore policy falls back
to the checkpoint before, in full."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from tests.support import COUNTER, Daemon, free_port, http_get, kill_tree, serve
from tests.support.lazy import checksum_server_checkpointed
from tests.support.paths import PROGRAMS
from tests.support.redis_server import redis_client, redis_command


def lazy_done(d: Daemon, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while "all pages arrived" not in d.log.read_text():
        assert time.monotonic() < deadline, d.log.read_text()[-3000:]
        time.sleep(0.1)


def test_the_counter_restores_lazily_and_serves_its_count(daemon: Daemon) -> None:
    port = free_port()
    daemon.cli("run", "web", "--no-auto-restore", "--lazy-restore", "--",
               sys.executable, str(COUNTER), str(port))  # fmt: skip
    assert serve(port, 7) == "7"
    daemon.checkpoint("web")
    kill_tree(daemon.pid("web"))
    daemon.drop_kept_images()  # as after a reboot: the pages come from the repository
    r = daemon.json("restore", "web")
    assert r["source"] == "repository, lazily (pages on demand)", r
    assert http_get(port) == "8"
    lazy_done(daemon)
    assert http_get(port) == "9"


def value(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).hexdigest().encode() * 12  # 768 bytes


def test_redis_with_200mb_restores_lazily_and_every_key_reads_back(daemon: Daemon) -> None:
    port = free_port()
    daemon.cli("run", "cache", "--no-auto-restore", "--lazy-restore", "--",
               *redis_command(port))  # fmt: skip
    client = redis_client(port)
    keys = 200 * 1024 * 1024 // 1000
    for start in range(0, keys, 10_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 10_000, keys)):
            pipe.set(f"k{i}", value(i))
        pipe.execute()
    client.close()
    daemon.checkpoint("cache")
    kill_tree(daemon.pid("cache"))
    daemon.drop_kept_images()
    t0 = time.monotonic()
    r = daemon.json("restore", "cache")
    client = redis_client(port, timeout=60, socket_timeout=60)
    first_answer = time.monotonic() - t0
    assert r["source"].startswith("repository, lazily"), r
    assert int(client.dbsize()) == keys
    for start in range(0, keys, 10_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 10_000, keys)):
            pipe.get(f"k{i}")
        got = pipe.execute()
        bad = [start + j for j, v in enumerate(got) if v != value(start + j)]
        assert not bad, f"{len(bad)} keys differ, first k{bad[0]}"
    client.close()
    lazy_done(daemon)
    assert first_answer < 30


def test_the_daemon_killed_mid_transfer_takes_the_tree_with_it_never_zero_pages(
    daemon: Daemon,
) -> None:
    """kill -9 of the daemon while pages are still coming: its guard kills the tree, which
    meanwhile waits on the missing pages (the guard holds their userfaultfds) instead of
    reading zeros; the tree never answers a wrong digest. Restarted, the daemon restores it."""
    port = free_port()
    right = checksum_server_checkpointed(daemon, port, 300)
    pid = daemon.json("restore", "sums")["pid"]
    assert daemon.proc is not None
    daemon.proc.kill()  # mid-transfer: 300 MB take over a second to arrive
    daemon.proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            answer = http_get(port, timeout=0.5)
        except OSError:
            continue
        assert answer == right, "the tree ran on pages that never came"
    assert not Path(f"/proc/{pid}").exists(), "the tree outlived its daemon and its pages"
    # Killed by the guard, not by luck (a Python tree on zero pages usually crashes too).
    assert f"killed the restored tree (pid {pid})" in daemon.log.read_text()
    daemon.start()
    daemon.cli("restore", "sums", "--full")
    assert http_get(port, timeout=60) == right


def test_a_pack_damaged_mid_transfer_kills_the_tree_and_the_one_before_is_restored(
    daemon: Daemon,
) -> None:
    port = free_port()
    daemon.cli("run", "web", "--lazy-restore", "--",
               sys.executable, str(PROGRAMS / "ballast_server.py"), str(port), "64")  # fmt: skip
    assert serve(port, 3) == "3"
    older = daemon.checkpoint("web")
    packs = daemon.state / "repository" / "wpacks" / "web"
    before = set(packs.rglob("*.pack"))
    assert http_get(port, path="/reshuffle") == "4"  # every page of the ballast new
    newer = daemon.checkpoint("web")
    new_packs = sorted(set(packs.rglob("*.pack")) - before, key=lambda p: p.stat().st_mtime)
    assert len(new_packs) >= 8, new_packs
    victim = new_packs[len(new_packs) // 2]  # ballast pages: fetched after the tree runs
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    daemon.drop_kept_images()
    kill_tree(daemon.pid("web"))  # the policy restores it: lazily, from `newer`
    st = daemon.wait_for(
        "web",
        lambda s: (
            any(a["reason"] == "lazy" for a in s["restores"])
            and s["state"] == "running"
            and s["restores"][-1]["checkpoint"] == older
        ),
        timeout=120,
    )
    lazy = [a for a in st["restores"] if a["reason"] == "lazy"]
    assert lazy[-1]["checkpoint"] == newer and "killed" in lazy[-1]["detail"], lazy
    assert newer in st["bad_checkpoints"]
    assert st["restores"][-1]["detail"].endswith("from the repository"), st["restores"]
    assert http_get(port) == "4"  # the older checkpoint's count (3), + 1
    log = daemon.log.read_text()
    assert "lazy restore of web failed" in log and "corrupt" in log, log[-3000:]


def test_lazy_restore_is_off_by_default(daemon: Daemon) -> None:
    port = free_port()
    daemon.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
    http_get(port)
    daemon.checkpoint("web")
    kill_tree(daemon.pid("web"))
    daemon.drop_kept_images()
    assert daemon.json("restore", "web")["source"] == "repository"
    assert Path(daemon.log).read_text().count("lazy") == 0
    kill_tree(daemon.pid("web"))  # `restore --lazy` asks for one anyway
    assert daemon.json("restore", "web", "--lazy")["source"].startswith("repository, lazily")
    assert http_get(port) == "2"
