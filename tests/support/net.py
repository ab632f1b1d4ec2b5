"""Loopback ports and HTTP requests to the servers the tests start."""

from __future__ import annotations

import socket
import time
import urllib.request


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


def serve(port: int, n: int) -> str:
    """Make n requests; the last answer (the counter servers answer their count)."""
    last = ""
    for _ in range(n):
        last = http_get(port)
    return last
