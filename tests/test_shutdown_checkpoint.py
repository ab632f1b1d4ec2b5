"""A planned shutdown or reboot takes a final checkpoint (checkpointer/engine/shutdown.py),
triggered exactly as the unit does: its ExecStop line, run with a `systemctl` that answers
what systemd answers then ("stopping" at a shutdown, "running" at a service restart)."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.support import CLI, COUNTER, ROOT, Daemon, free_port, http_get, serve


def exec_stop(d: Daemon, fake_bin: Path, system_state: str) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStop, with the installed paths replaced by this checkout's CLI and the
    test daemon's config, and `systemctl is-system-running` answering `system_state`."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "configs" / "checkpointer.service")
    argv = shlex.split(unit["Service"]["ExecStop"])
    assert argv[0] == "/opt/checkpointer/venv/bin/checkpointer", argv
    argv = [*CLI, *(str(d.config) if a == "/etc/checkpointer/config.yaml" else a for a in argv[1:])]
    systemctl = fake_bin / "systemctl"
    systemctl.write_text(f"#!/bin/sh\necho {system_state}\nexit 1\n")  # non-zero unless running
    systemctl.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr + d.log.read_text()[-3000:]
    return r


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_reboot_restores_the_final_checkpoint_and_a_service_restart_takes_none(
    workdir: Path,
) -> None:
    boot_id = workdir / "boot_id"
    boot_id.write_text("boot-1\n")
    fake_bin = workdir / "bin"
    fake_bin.mkdir()
    d = Daemon(workdir)
    d.env = {"CHECKPOINTER_BOOT_ID_FILE": str(boot_id)}
    port = free_port()
    try:
        d.start()
        d.cli("run", "web", "--every", "1h", "--", sys.executable, str(COUNTER), str(port))
        serve(port, 3)
        scheduled = d.checkpoint("web")  # the last "scheduled" checkpoint: count 3
        pid = d.pid("web")

        # A service restart (upgrade, `systemctl restart`): ExecStop, SIGTERM, ExecStart.
        r = exec_stop(d, fake_bin, "running")
        assert "not shutting down" in r.stdout, r.stdout
        d.terminate()
        d.start()
        st = d.wait_for("web", lambda s: s["state"] == "running")
        assert st["pid"] == pid and st["restores"] == [], st  # re-adopted, not restored
        assert [c["id"] for c in d.json("list", "web")] == [scheduled]  # no final checkpoint
        n = int(serve(port, 4))
        assert n == 7

        # A shutdown that never came (cancelled, or the command run by hand): the next
        # daemon of the same boot thaws the tree it left stopped, and re-adopts it.
        exec_stop(d, fake_bin, "stopping")
        assert stopped(pid)
        d.terminate()
        d.start()
        st = d.wait_for("web", lambda s: s["state"] == "running")
        assert st["pid"] == pid and st["restores"] == [], st
        assert not stopped(pid) and http_get(port) == "8"
        n = 8

        # A reboot: ExecStop at system shutdown, then SIGTERM to the daemon, then the kill.
        t0 = time.monotonic()
        r = exec_stop(d, fake_bin, "stopping")
        took = time.monotonic() - t0
        final = d.json("list", "web")[0]["id"]
        assert final != scheduled
        assert stopped(pid)  # left stopped at its final checkpoint: nothing after it is lost
        print(f"\nplanned shutdown: ExecStop with 1 final checkpoint {took:.2f}s (budget 90s)")
        d.terminate()
        d.kill_workloads()
        d.drop_kept_images(disk=False)  # tmpfs is emptied by a reboot; the disk is not
        boot_id.write_text("boot-2\n")
        d.start()
        st = d.wait_for("web", lambda s: s["state"] == "running", timeout=60)
        assert st["restores"][-1]["reason"] == "boot", st
        assert st["restores"][-1]["checkpoint"] == final, st
        # From the disk image the final checkpoint wrote, lazily (the repository was 5x slower)
        assert st["restores"][-1]["detail"].endswith(
            "from the disk image, lazily (pages on demand, each checked)"
        ), st
        assert http_get(port) == str(n + 1)  # not 4: nothing since the last schedule lost
        assert "comes back from its final checkpoint" in d.log.read_text()
    finally:
        d.stop()


def test_workloads_past_the_budget_keep_their_last_checkpoint(tmp_path: Path) -> None:
    """Oldest checkpoint first; once less budget is left than the longest final checkpoint
    took, the rest are skipped with the reason, not started (a dump cannot be cut short)."""
    import contextlib
    import threading
    from types import SimpleNamespace
    from typing import Any

    from checkpointer.engine import shutdown

    class W(SimpleNamespace):
        def alive(self) -> bool:
            return True

    ws = [
        W(name=n, last_checkpoint=f"c-{n}", last_checkpoint_at=t, container=None, pid=None)
        for n, t in (("new", 30.0), ("old", 10.0), ("mid", 20.0))
    ]
    taken: list[str] = []

    def run(w: Any, generation: int | None, final: bool, for_reboot: bool) -> dict[str, Any]:
        assert final and for_reboot  # a reboot's: copied into a disk slot too
        taken.append(w.name)
        time.sleep(0.3)
        return {"id": f"final-{w.name}"}

    engine: Any = SimpleNamespace(
        workloads=lambda: ws,
        locked=lambda w, wait: contextlib.nullcontext(),
        ownership=SimpleNamespace(hold=lambda name: None),
        checkpoints=SimpleNamespace(run=run),
        save=lambda: None,
        config=SimpleNamespace(state_dir=tmp_path),
        lock=threading.Lock(),
    )
    r = shutdown.take_final_checkpoints(engine, budget=0.8)
    assert taken == ["old", "mid"]  # "new": 0.2 s left < 0.3 s, the longest so far
    got = {o["workload"]: (o["result"], o["checkpoint"]) for o in r["workloads"]}
    assert got == {"old": ("final", "final-old"), "mid": ("final", "final-mid"),
                   "new": ("kept", "c-new")}  # fmt: skip
    assert "keeps its last scheduled checkpoint (c-new)" in r["workloads"][2]["why"]
