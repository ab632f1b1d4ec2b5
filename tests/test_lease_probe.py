"""What fleet mode checks of the store at start: conditional writes (a store that refuses the
headers, as Backblaze B2 does with 501, or enforces them one request at a time but not under
concurrency, is refused with words that say so; moto passes) and its clock (the Date header)
against this host's."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from checkpointer.config import Config
from checkpointer.daemon.fleet import ClockSkewed, Fleet
from checkpointer.daemon.metrics import EngineCollector
from checkpointer.engine.workload import Workload
from storage.backends import LocalBlobStore
from storage.backends.base import BlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.crypto import Sealed, new_master
from storage.errors import BlobNotFound, ConditionalWritesUnsupported, PreconditionFailed
from storage.lease_probe import probe_conditional_writes
from tests.support import S3_ENV, Moto
from tests.test_leases import s3_store

_NOT_IMPLEMENTED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>A header '
    b"you provided implies functionality that is not implemented</Message></Error>"
)


class _Answers501(BaseHTTPRequestHandler):
    """What Backblaze B2's S3 API answers to a PutObject with If-Match or If-None-Match."""

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(501)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(_NOT_IMPLEMENTED)))
        self.end_headers()
        self.wfile.write(_NOT_IMPLEMENTED)

    do_PUT = do_GET = do_HEAD = do_POST = _refuse

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def b2_like() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers501)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_store_that_answers_501_to_conditional_writes_is_refused_not_retried(
    b2_like: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    store = S3BlobStore(S3Settings(bucket="b2", endpoint_url=b2_like, region="us-east-1"))
    t0 = time.monotonic()
    with pytest.raises(ConditionalWritesUnsupported) as e:
        probe_conditional_writes(store)
    assert "does not support conditional writes" in str(e.value)
    assert "501" in str(e.value) and "without fleet" in str(e.value)
    assert time.monotonic() - t0 < 5  # at once: not a transient outage waited out


class CheckThenSet(LocalBlobStore):
    """Correct one request at a time, not atomic under concurrency: reads the version, waits
    a little (a server doing other work), then writes (what SeaweedFS once did)."""

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        try:
            _, current = self.get_versioned(key)
        except BlobNotFound:
            current = None
        if current != match:
            raise PreconditionFailed(f"{key} changed since it was read")
        time.sleep(0.05)
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


def test_a_store_whose_conditional_writes_are_not_atomic_under_concurrency_is_refused(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConditionalWritesUnsupported) as e:
        probe_conditional_writes(CheckThenSet(tmp_path / "racy"))
    message = str(e.value)
    assert "does not support conditional writes" in message
    assert "concurrent create-only puts" in message and "not atomic" in message, message


def test_moto_and_the_local_store_pass_the_probe_again_and_again(
    tmp_path: Path, moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto checks then sets, without a lock, within one Python call: two of 16 won in 1 of
    450 rounds here, which the probe logs and lets pass once (storage/lease_probe.py); a store
    that loses every round, as CheckThenSet does, is refused."""
    store = s3_store(moto, bucket, monkeypatch)
    for _ in range(2):
        probe_conditional_writes(store)
    local = LocalBlobStore(tmp_path / "repo")
    probe_conditional_writes(local)
    assert not [k for k in moto.keys(bucket) if "fleet-probe-" in k]  # raced keys deleted


def fleet_of(store: BlobStore, offset: float) -> Fleet:
    config = Config.model_validate(
        {"host": {"id": "a"}, "fleet": {"enabled": True, "lease_ttl": "6s",
                                        "renew_every": "1s", "clock_skew": "2s"}}
    )  # fmt: skip
    return Fleet(config, store, Sealed(new_master()), clock=lambda: time.time() + offset)


def test_a_host_whose_clock_is_off_by_more_than_clock_skew_refuses_fleet_mode(
    moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto answers with this machine's clock in its Date header: a host whose clock is 30 s
    ahead (or 4 s behind, with clock_skew 2 s) is refused with one clear error; one within
    the skew runs, and the offset is exported as a metric."""
    store = s3_store(moto, bucket, monkeypatch)
    for offset in (30.0, -4.0):
        with pytest.raises(ClockSkewed, match=r"differs from the store's .* more than") as e:
            fleet_of(store, offset).check_store()
        assert "fleet.clock_skew (2s)" in str(e.value) and "timedatectl" in str(e.value)
    ok = fleet_of(store, 0.6)
    ok.check_store()
    assert ok.clock_offset is not None and abs(ok.clock_offset + 0.6) <= 1.5
    scraped = {
        m.name: m.samples[0].value
        for m in EngineCollector(_NoWorkloads(), None, 0, ok).collect()
        if m.samples
    }
    assert abs(scraped["checkpointer_clock_offset_seconds"] + 0.6) <= 1.5


class _NoWorkloads:
    def workloads(self) -> list[Workload]:
        return []
