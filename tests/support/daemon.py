"""A real checkpointer daemon on a private state folder, driven through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from checkpointer.api import Op
from checkpointer.cli.client import call
from checkpointer.errors import CheckpointerError
from tests.support import leftovers
from tests.support.host import require_root_and_criu
from tests.support.net import free_port
from tests.support.paths import CLI
from tests.support.processes import kill_tree, start_time


class Daemon:
    """A checkpointer daemon on its own state folder, and the CLI pointed at it. Fails the test
    at once unless it runs as root with criu installed."""

    def __init__(
        self,
        base: Path,
        extra_config: str = "",
        key_file: Path | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """`key_file`: the repository's access key (default BASE/repository.key, made by the
        daemon with a new repository); hosts sharing one repository pass the same file.
        `state_dir`: the state folder (default BASE/state). `prefix` (set before start()) is
        put before the daemon's and the CLI's commands, e.g. an nsenter into namespaces."""
        require_root_and_criu()
        self.base = base
        self.state = state_dir or base / "state"
        self.config = base / "config.yaml"
        self.key_file = key_file or base / "repository.key"
        self.metrics_port = free_port()
        metrics = "" if "metrics:" in extra_config else f"metrics:\n  port: {self.metrics_port}\n"
        key = f"  key_file: {self.key_file}\n"
        if "storage:\n" in extra_config:
            extra_config = extra_config.replace("storage:\n", "storage:\n" + key, 1)
        else:
            extra_config += "\nstorage:\n" + key
        self.config.write_text(f"state_dir: {self.state}\n{metrics}{extra_config}")
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.args: list[str] = []
        self.prefix: list[str] = []

    def start(self) -> None:
        from checkpointer.engine import tmpfs_scratch_root

        leftovers.made("shm", tmpfs_scratch_root(self.state))  # stop() removes it
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *CLI, "daemon", "--config", str(self.config), *self.args],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=self.base,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 20
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    # Polling asks the daemon's socket from this process, as the CLI would: `status --json`
    # prints the daemon's answer as it is (checkpointer.api), and each CLI process costs about
    # 0.4 s of CPU to start, which parallel tests share (on two cores, a poll every 0.1 s was a
    # CLI process every second, burning a third of a core while a test waited). Every test
    # drives the daemon through the CLI right after, which checks the CLI's side.

    def api_socket(self) -> Path:
        """The daemon's API socket as this process reaches it (the config's `socket`, if set)."""
        config = yaml.safe_load(self.config.read_text()) or {}
        return Path(config.get("socket") or self.state / "checkpointer.sock")

    def _answers(self) -> bool:
        """Whether the daemon answers `status` yet: on its socket or, if that cannot be reached
        from here, through the CLI."""
        try:
            call(self.api_socket(), Op.STATUS, name=None)
        except CheckpointerError:
            return False
        except (OSError, ValueError):
            return self.cli("status", check=False).returncode == 0
        return True

    def _status_now(self, name: str) -> dict[str, Any]:
        """`status NAME` from the daemon's socket; a daemon that cannot answer fails the test
        with its log, as the CLI's error would."""
        try:
            rows = call(self.api_socket(), Op.STATUS, name=name)
        except CheckpointerError as e:
            raise AssertionError(
                f"status {name} failed: {e}\n--- daemon log ---\n{self.log.read_text()[-4000:]}"
            ) from None
        except (OSError, ValueError):  # e.g. a path too long for a socket: ask the CLI
            return self.status(name)
        return dict(rows[0])

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the CLI on this daemon. Its working directory is BASE, which `run` gives the
        workload: CRIU dumps a managed workload through a `proc.crtools` folder made in its
        working directory, and the daemon's lock against two dumps colliding there covers only
        its own workloads, so daemons (parallel tests, the hosts of one test) must not share
        one. Each test's workloads are also found by it (tests.support.processes)."""
        cmd = [*self.prefix, *CLI, args[0], "--config", str(self.config), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.base, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({r.returncode}): {r.stderr}"
                f"\n--- daemon log ---\n{self.log.read_text()[-4000:]}"
            )
        return r

    def wait_for(self, name: str, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Poll `status NAME` until pred(status) holds; fail with the daemon's log if never.
        A workload this daemon does not know yet (one handed to it by another host, which
        registers it when it sees the lease: the sender's command may return first) is waited
        for like any other state."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self._status_now(name)
            except AssertionError as e:
                if "unknown workload" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"status never matched: {st}\n--- daemon log ---\n"
                    f"{self.log.read_text()[-4000:]}"
                )
            time.sleep(0.1)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.json("status", name)[0])

    def pid(self, name: str) -> int:
        return int(self.status(name)["pid"])

    def checkpoint(self, name: str) -> str:
        return str(self.json("checkpoint", name)["id"])

    def drop_kept_images(self, disk: bool = True) -> None:
        """Forget the newest images kept in tmpfs (as a reboot would) and, unless `disk` is
        False, those kept on disk: restores then read the repository, which is what tests of
        repository damage need."""
        from checkpointer.engine import tmpfs_scratch_root

        shutil.rmtree(tmpfs_scratch_root(self.state) / "hot", ignore_errors=True)
        if disk:
            shutil.rmtree(self.state / "images", ignore_errors=True)

    def workload_log(self, name: str) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def terminate(self) -> None:
        """SIGTERM the daemon and wait for it (SIGKILL after 60 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the daemon first (so it restores nothing more), then every workload it had, and
        remove its /dev/shm folder: also when the daemon is already gone (a test killed or
        terminated it), whose workloads and folder are still there."""
        self.terminate()
        self.kill_workloads()
        from checkpointer.engine import tmpfs_scratch_root

        shutil.rmtree(tmpfs_scratch_root(self.state), ignore_errors=True)

    def kill_workloads(self) -> None:
        registry = self.state / "workloads.json"
        if not registry.exists():
            return
        for w in json.loads(registry.read_text())["workloads"]:
            if w["pid"] and start_time(int(w["pid"])) == w["started"]:
                kill_tree(int(w["pid"]), reaped=False)  # the daemon is gone: PID 1 reaps


def refused_start(config: Path) -> str:
    """Start `checkpointer daemon` on `config`, which it must refuse: a non-zero exit with
    one clear line, no traceback, no "internal error". Its stderr."""
    r = subprocess.run(
        [*CLI, "daemon", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r.stderr
