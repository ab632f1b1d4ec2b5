"""Loopback ports and HTTP requests to the servers the tests start."""

from __future__ import annotations

import contextlib
import itertools
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.workers import share

# Ports handed out below the kernel's ephemeral range (32768 on Linux by default), so that no
# outgoing connection can have taken one between free_port() and the server's bind.
_FIRST_PORT = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _candidates() -> Iterator[int]:
    """This worker's ports, round and round from a random start: parallel test workers (and
    benchmarks) draw from disjoint slices, and a port handed out is not handed out again by
    this process before every other one of its slice was, even if nothing has bound it yet."""
    last = _ephemeral_start() - 1
    if last - _FIRST_PORT < 1000:  # an unusual ephemeral range: let the kernel pick
        return iter(())
    ports = share(_FIRST_PORT, last)
    start = secrets.randbelow(len(ports))
    return itertools.cycle([*ports[start:], *ports[:start]])


_PORTS: Iterator[int] | None = None


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test is about to start."""
    global _PORTS
    if _PORTS is None:
        _PORTS = _candidates()
    for port in itertools.islice(_PORTS, 2000):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("0.0.0.0", port))  # taken on any address (or in TIME_WAIT): skip it
            return port
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
