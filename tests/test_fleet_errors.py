"""Fleet mode refusals: each is one clear error, and the workload keeps running where it was.

Two daemons on one bucket (moto over HTTP) with their own state folders; these tests are
about what is refused, so they need no network namespaces (tests/test_fleet.py has those)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import CLI, COUNTER, ROOT, S3_ENV, Daemon, Moto, free_port, http_get, s3_config

FLEET = (
    "host:\n  id: {id}\n"
    "fleet:\n  enabled: true\n  lease_ttl: 6s\n  renew_every: 1s\n  clock_skew: 1s\n"
)


def fleet_host(base: Path, moto: Moto, bucket: str, host: str, key: Path | None = None) -> Daemon:
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon(base, s3_config(moto, bucket) + FLEET.format(id=host), key)
    d.env.update(S3_ENV)
    return d


def fails(d: Daemon, *args: str) -> str:
    r = d.cli(*args, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_migrate_and_run_refusals_leave_the_tree_running(
    workdir: Path, moto: Moto, bucket: str
) -> None:
    a = fleet_host(workdir / "a", moto, bucket, "host-a")
    port = free_port()
    try:
        a.start()
        b = fleet_host(workdir / "b", moto, bucket, "host-b", a.key_file)
        b.start()
        a.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        assert http_get(port) == "1"
        a.checkpoint("web")
        assert "not a live host" in fails(a, "migrate", "web", "--to", "host-zz")
        assert "already runs on host-a" in fails(a, "migrate", "web", "--to", "host-a")
        assert "unknown" in fails(a, "migrate", "nosuch", "--to", "host-b").lower()
        # host B may not start the same workload: host A owns it
        other = free_port()
        message = fails(b, "run", "web", "--", sys.executable, str(COUNTER), str(other))
        assert "owned by host host-a" in message
        assert "owned by host host-a" in fails(b, "restore", "web")
        assert b.json("status") == []  # nothing registered on B by the refusals
        assert http_get(port) == "2"  # still there, state intact
        # the bucket goes down during the migration: refused before the hand-over, thawed
        moto.pause()
        try:
            message = fails(a, "migrate", "web", "--to", "host-b")
        finally:
            moto.resume()
        assert "the tree runs on here" in message or "cannot reach" in message, message
        assert http_get(port) == "3"
        assert a.status("web")["state"] == "running"
    finally:
        a.stop()
        b.stop()


def test_fleet_mode_needs_object_storage_and_migrate_needs_a_fleet(workdir: Path) -> None:
    d = Daemon(workdir, "fleet:\n  enabled: true\n")
    r = subprocess.run(
        [*CLI, "daemon", "--config", str(d.config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and "fleet mode needs S3 storage" in r.stderr, r.stderr
    (workdir / "plain").mkdir()
    plain = Daemon(workdir / "plain")
    port = free_port()
    try:
        plain.start()
        plain.cli("run", "web", "--", sys.executable, str(COUNTER), str(port))
        assert "needs fleet mode" in fails(plain, "migrate", "web", "--to", "other")
        assert "not in a fleet" in fails(plain, "hosts")
        assert http_get(port) == "1"
    finally:
        plain.stop()
