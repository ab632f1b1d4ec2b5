"""A Redis server (Debian's package) as a workload, and a client of it.

Named redis_server, not redis, so as not to shadow the `redis` client package."""

from __future__ import annotations

import time
from typing import Any


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


def redis_client(port: int, timeout: float = 10.0, socket_timeout: float = 10.0) -> Any:
    """A client of the Redis on `port`, once it answers PING (it may be starting, or being
    restored). Close it before a checkpoint: an open connection is an established socket."""
    import redis

    deadline = time.monotonic() + timeout
    while True:
        client = redis.Redis(port=port, socket_timeout=socket_timeout)
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
