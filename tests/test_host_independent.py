"""A checkpoint restores on a host whose state folder is elsewhere: nothing the service itself
adds to the tree (the log FIFO) is tied to the host that took it."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from tests.support import COUNTER, Daemon, free_port, http_get, kill_tree, serve


def test_restore_on_a_host_with_another_state_dir_and_the_first_ones_gone(workdir: Path) -> None:
    repo = workdir / "shared-repository"
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    a = Daemon(workdir / "a", f"storage:\n  path: {repo}\n")
    b = Daemon(workdir / "b", f"storage:\n  path: {repo}\n", key_file=a.key_file)
    port = free_port()
    try:
        a.start()
        a.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
        serve(port, 5)
        a.checkpoint("web")
        kill_tree(a.pid("web"))
        a.stop()
        shutil.rmtree(a.state)  # host A is gone: its FIFO path no longer exists
        b.start()
        b.cli("restore", "web")
        assert http_get(port) == "6"
        deadline = time.monotonic() + 10
        while "served request 6" not in b.workload_log("web"):
            assert time.monotonic() < deadline, b.workload_log("web") or b.log.read_text()[-2000:]
            time.sleep(0.1)
        assert str(b.state) != str(a.state)
    finally:
        a.stop()
        b.stop()
