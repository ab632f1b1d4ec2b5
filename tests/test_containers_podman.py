"""Podman containers (runtime runc) as workloads: checkpointed on schedule, restored by the
daemon when killed with the files they wrote in their rootfs, and rolled back."""

from __future__ import annotations

import os
import time

from tests.support import Daemon, free_port
from tests.support.containers import ask, podman, podman_container, podman_pid, restored_since
from tests.test_containers_lxc import checkpoint_after


def test_podman_container_on_schedule_restored_with_its_rootfs_file_and_rolled_back(
    daemon: Daemon,
) -> None:
    name, port = f"ckt-podman-{os.getpid()}", free_port()
    with podman_container(name, port):
        daemon.cli("register", "web", "--podman", name, "--every", "2s")
        st = daemon.status("web")
        assert st["kind"] == "podman" and st["pid"] == podman_pid(name)
        assert [ask(st["pid"], port) for _ in range(2)] == ["1", "2"]
        older = checkpoint_after(daemon, "web", time.time())
        assert ask(st["pid"], port, "/write/marker") == "3"  # /srv/marker in its rootfs: "3"
        newer = checkpoint_after(daemon, "web", time.time())
        assert ask(st["pid"], port) == "4"
        podman("kill", name)
        # The new PID shows before the restore is recorded: wait for the record too.
        st = daemon.wait_for("web", lambda s: restored_since(s, st), timeout=60)
        assert st["restores"][-1]["reason"] == "crash", st["restores"]
        assert st["restores"][-1]["checkpoint"] >= newer  # ids sort by time: newer or later
        assert ask(podman_pid(name), port) == "4"  # the count at the checkpoint, + 1
        assert podman("exec", name, "cat", "/srv/marker").stdout.strip() == "3"
        daemon.cli("rollback", "web", "--to", older)
        assert ask(podman_pid(name), port) == "3"  # the older checkpoint's count, + 1
        r = podman("exec", name, "cat", "/srv/marker", check=False)
        assert r.returncode != 0  # written after that checkpoint: gone with the rollback
