"""Fixtures: a real daemon per test, on a private state folder, driven through the real CLI.

Everything here runs for real: CRIU as root, the daemon as a subprocess, workloads as process
trees. Every process a test starts is killed by PID at the end, the daemon last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "checkpointer.cli"]
COUNTER = ROOT / "examples" / "counter_server.py"
PROGRAMS = Path(__file__).resolve().parent / "programs"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        pytest.exit("the tests run CRIU and must run as root", returncode=1)
    if shutil.which("criu") is None:
        pytest.exit("criu is not installed: run `make test`, which builds it", returncode=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, timeout: float = 10.0, path: str = "/") -> str:
    """GET on loopback, retrying while the server is not (yet, or again) listening."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return str(r.read().decode().strip())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def redis_client(port: int, timeout: float = 10.0) -> Any:
    """A client of the Redis on `port`, once it answers PING (it may be starting, or being
    restored). Close it before a checkpoint: an open connection is an established socket."""
    import redis

    deadline = time.monotonic() + timeout
    while True:
        client = redis.Redis(port=port, socket_timeout=10)
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def serve(port: int, n: int) -> str:
    """Make n requests; the last answer (the counter servers answer their count)."""
    last = ""
    for _ in range(n):
        last = http_get(port)
    return last


def redis_command(port: int) -> list[str]:
    """Redis from Debian's package on loopback, persistence off: state lives only in memory."""
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]


@contextlib.contextmanager
def counter_started_elsewhere(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A counter server that the daemon did not start (to adopt), killed and reaped at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(COUNTER), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        http_get(port)  # listening; this is request 1
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tree_pids(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    out, stack = [root], [root]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def kill_tree(root: int) -> None:
    """kill -9 every process of the tree, as a crash or the OOM killer would."""
    for pid in tree_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{root}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class Daemon:
    """A checkpointer daemon on its own state folder, and the CLI pointed at it."""

    def __init__(self, base: Path, extra_config: str = "") -> None:
        self.base = base
        self.state = base / "state"
        self.config = base / "config.yaml"
        self.metrics_port = free_port()
        metrics = "" if "metrics:" in extra_config else f"metrics:\n  port: {self.metrics_port}\n"
        self.config.write_text(f"state_dir: {self.state}\n{metrics}{extra_config}")
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.args: list[str] = []

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "daemon", "--config", str(self.config), *self.args],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 20
        while self.cli("status", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*CLI, args[0], "--config", str(self.config), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({r.returncode}): {r.stderr}"
                f"\n--- daemon log ---\n{self.log.read_text()[-4000:]}"
            )
        return r

    def wait_for(self, name: str, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Poll `status NAME` until pred(status) holds; fail with the daemon's log if never."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
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

    def drop_kept_images(self) -> None:
        """Forget the newest images kept in tmpfs (as a reboot would): restores then read the
        repository, which is what tests of repository damage need."""
        from checkpointer.engine import tmpfs_scratch_root

        shutil.rmtree(tmpfs_scratch_root(self.state) / "hot", ignore_errors=True)

    def workload_log(self, name: str) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop the daemon first (so it restores nothing more), then every workload it had."""
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
        self.kill_workloads()
        from checkpointer.engine import tmpfs_scratch_root

        shutil.rmtree(tmpfs_scratch_root(self.state), ignore_errors=True)

    def kill_workloads(self) -> None:
        registry = self.state / "workloads.json"
        if not registry.exists():
            return
        for w in json.loads(registry.read_text())["workloads"]:
            if w["pid"] and start_time(int(w["pid"])) == w["started"]:
                kill_tree(int(w["pid"]))


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ckpt-test-"))
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    d = Daemon(workdir)
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def counter(daemon: Daemon) -> Iterator[tuple[Daemon, int]]:
    """The seed workload: a managed HTTP server counting requests in memory (manual restore)."""
    port = free_port()
    # Automatic restore is off: these tests kill the tree and restore it by hand.
    daemon.cli("run", "web", "--no-auto-restore", "--", sys.executable, str(COUNTER), str(port))
    http_get(port)  # wait until it listens; this is request 1
    yield daemon, port


class Moto:
    """An S3 server (moto_server) on loopback, spoken to over HTTP like any S3 endpoint."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_config(moto: Moto, bucket: str, extra: str = "") -> str:
    return f"""storage:
  backend: s3
  gc_grace: 1h
  retries: {{attempts: 2, max_delay: 3s}}
  s3:
    bucket: {bucket}
    prefix: ckpt
    endpoint_url: {moto.url}
    region: us-east-1
    addressing_style: path
    connect_timeout: 2s
    read_timeout: 3s
{extra}"""


@pytest.fixture
def moto() -> Iterator[Moto]:
    m = Moto()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def bucket(moto: Moto) -> str:
    name = f"ckpt-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    moto.client().create_bucket(Bucket=name)
    return name
