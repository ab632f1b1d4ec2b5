"""S3 GETs read straight into a reused buffer (how a restore reads packs from the bucket):
the bytes are the object's, a size over the limit is refused before anything is read, and an
endpoint that cuts a body short, or says one length and sends another, is an error to retry,
never a short pack handed on. Through boto3 over HTTP: moto_server, and a small HTTP/1.1
server of the test's own where an endpoint must misbehave."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from checkpointer.repository.stack import open_repository
from storage.backends.retrying import RetryingBlobStore
from storage.backends.s3 import S3BlobStore, S3Settings
from storage.errors import BlobNotFound, BlobTooLarge, CorruptCheckpoint, TransientStorageError
from storage.keys import pack_key
from tests.support import S3_ENV, Moto, s3_repository_config


class Buffers:
    """A `buffer` callback that hands out one bytearray, grown when too small, and counts."""

    def __init__(self) -> None:
        self.buf = bytearray(16)
        self.asked: list[int] = []

    def __call__(self, n: int) -> bytearray:
        self.asked.append(n)
        if len(self.buf) < n:
            self.buf = bytearray(n)
        return self.buf


def store_at(url: str, bucket: str) -> S3BlobStore:
    return S3BlobStore(
        S3Settings(
            bucket=bucket,
            endpoint_url=url,
            region="us-east-1",
            addressing_style="path",
            access_key_id="testing",
            secret_access_key="testing",
            read_timeout=5,
        )
    )


def test_get_into_reads_each_object_whole_into_the_callers_buffer(moto: Moto, bucket: str) -> None:
    store = store_at(moto.url, bucket)
    blobs = {
        "packs/a.pack": os.urandom(4 * 1024 * 1024 + 17),
        "packs/b.pack": os.urandom(1000),
        "packs/empty.pack": b"",
    }
    for key, data in blobs.items():
        store.put(key, data)
    buffers = Buffers()
    for _ in range(2):  # a second round reads over the first one's bytes
        for key, data in blobs.items():
            got = store.get_into(key, buffers, limit=8 * 1024 * 1024)
            assert bytes(got) == data
            assert isinstance(got, memoryview) and got.obj is buffers.buf
    assert buffers.asked == [len(d) for d in blobs.values()] * 2


def test_get_into_refuses_a_size_over_the_limit_before_reading(moto: Moto, bucket: str) -> None:
    store = store_at(moto.url, bucket)
    store.put("packs/big.pack", os.urandom(100_000))
    buffers = Buffers()
    with pytest.raises(BlobTooLarge, match="100000"):
        store.get_into("packs/big.pack", buffers, limit=99_999)
    assert buffers.asked == []  # nothing allocated for what the endpoint claims
    with pytest.raises(BlobNotFound):
        store.get_into("packs/none.pack", buffers)
    # The connection the refused GET left is not reused mid-body: the next one is whole.
    assert bytes(store.get_into("packs/big.pack", buffers)) == store.get("packs/big.pack")


class Endpoint:
    """An HTTP/1.1 server answering every GET with `body` under a Content-Length of
    `length` (the lie under test), keeping connections alive; counts connections and GETs."""

    def __init__(self) -> None:
        self.body = b""
        self.length = 0
        self.reset = False  # end a short body with a TCP reset, not a close
        self.chunked = False  # no Content-Length: Transfer-Encoding: chunked
        self.connections = 0
        self.gets = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                endpoint.connections += 1
                super().setup()

            def do_GET(self) -> None:
                endpoint.gets += 1
                body, length = endpoint.body, endpoint.length
                self.send_response(200)
                if endpoint.chunked:  # no length said: the body streamed in chunks
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("ETag", '"e"')
                    self.end_headers()
                    for at in range(0, len(body), 65536):
                        piece = body[at : at + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return
                self.send_header("Content-Length", str(length))
                self.send_header("ETag", '"e"')
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if len(body) < length:  # cut short: the connection ends mid-body
                    self.close_connection = True
                    if endpoint.reset:
                        linger = struct.pack("ii", 1, 0)
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        self.connection.close()
                    else:
                        self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, body: bytes, length: int | None = None) -> None:
        self.body, self.length = body, len(body) if length is None else length

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    try:
        yield e
    finally:
        e.stop()


def test_a_whole_body_hands_the_connection_back_for_the_next_get(endpoint: Endpoint) -> None:
    store = store_at(endpoint.url, "bucket")
    data = os.urandom(300_000)
    endpoint.serve(data)
    buffers = Buffers()
    for _ in range(3):
        assert bytes(store.get_into("packs/p.pack", buffers)) == data
    assert endpoint.gets == 3
    assert endpoint.connections == 1  # kept alive, as after a whole `get`


@pytest.mark.parametrize("cut", ["mid-body", "no body", "reset"])
def test_a_body_cut_short_is_a_transient_error_and_is_retried(endpoint: Endpoint, cut: str) -> None:
    data = os.urandom(200_000)
    endpoint.reset = cut == "reset"
    endpoint.serve(data[: 0 if cut == "no body" else 120_000], length=len(data))
    store = store_at(endpoint.url, "bucket")
    buffers = Buffers()
    with pytest.raises(TransientStorageError, match=r"packs/p\.pack"):
        store.get_into("packs/p.pack", buffers)
    # The retrying layer tries again; once the endpoint sends it whole, the pack is whole.
    seen: list[str] = []

    def heal(op: str) -> None:
        seen.append(op)
        endpoint.serve(data)

    endpoint.reset = False
    retrying = RetryingBlobStore(store, attempts=3, initial_wait=0.01, on_retry=heal)
    endpoint.serve(data[:1000], length=len(data))
    assert bytes(retrying.get_into("packs/p.pack", buffers)) == data
    assert seen == ["get"]


def test_a_body_longer_than_its_length_yields_only_the_length(endpoint: Endpoint) -> None:
    """What the endpoint sends past its Content-Length is not the object's: never returned
    (and the connection it was sent on is not trusted for the next GET)."""
    data = os.urandom(50_000)
    endpoint.serve(data + b"trailing junk" * 100, length=len(data))
    store = store_at(endpoint.url, "bucket")
    buffers = Buffers()
    got = store.get_into("packs/p.pack", buffers)
    assert bytes(got) == data
    endpoint.serve(os.urandom(50_000))
    assert bytes(store.get_into("packs/p.pack", buffers)) == endpoint.body


def test_a_body_of_unsaid_length_is_refused_once_it_passes_the_limit(endpoint: Endpoint) -> None:
    """An endpoint that streams an object without a Content-Length (chunked) cannot make a
    read take more than the limit into memory: `get` and `get_into` refuse it as soon as it
    passes the limit, and read it whole when it is within."""
    endpoint.chunked = True
    data = os.urandom(300_000)
    endpoint.serve(data)
    store = store_at(endpoint.url, "bucket")
    buffers = Buffers()
    assert bytes(store.get_into("packs/p.pack", buffers, 300_000)) == data
    assert store.get("packs/p.pack", 300_000) == data
    with pytest.raises(BlobTooLarge, match=r"more than the 200000 bytes .* once that much"):
        store.get_into("packs/p.pack", buffers, 200_000)
    with pytest.raises(BlobTooLarge, match=r"more than the 200000 bytes .* once that much"):
        store.get("packs/p.pack", 200_000)
    assert buffers.asked == []  # a body of unsaid length never asks for a buffer
    assert store.get("packs/p.pack") == data  # no limit: whole


def test_a_restore_from_the_bucket_is_whole_and_refuses_a_flipped_byte_in_a_pack(
    tmp_path: Path, moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host, nothing cached: the packs come straight from the bucket into the
    reader threads' buffers (the daemon's storage stack, spool included)."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    key_file = tmp_path / "repository.key"
    src = tmp_path / "image"
    src.mkdir()
    # Hex text (frames) and random bytes (raw chunks): ~40 packs.
    with open(src / "pages-1.img", "wb") as f:
        for n in range(40 * 1024):
            f.write(os.urandom(2048).hex().encode() if n % 2 else os.urandom(4096))
    (src / "core-1.img").write_bytes(os.urandom(3000))
    repo, spool = open_repository(s3_repository_config(tmp_path / "a", key_file, moto.url, bucket))
    assert spool is not None
    m = repo.commit("w", src)
    assert spool.wait_uploaded(120)
    spool.close()
    assert len(m.packs) > 8

    def restore(host: str) -> Path:
        other, other_spool = open_repository(
            s3_repository_config(tmp_path / host, key_file, moto.url, bucket)
        )
        try:
            other.materialize("w", m.id, tmp_path / f"out-{host}")
        finally:
            assert other_spool is not None
            other_spool.close()
        return tmp_path / f"out-{host}"

    out = restore("b")
    for name in ("pages-1.img", "core-1.img"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    s3 = moto.client()
    key = f"ckpt/{pack_key(m.packs[len(m.packs) // 2], m.pack_home)}"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 1
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(CorruptCheckpoint, match="fails authentication") as err:
        restore("c")
    assert m.id in str(err.value)
