"""What the benchmark checkpoints: a Redis holding MB of values, a Python bytearray. Each is a
tree launched as a managed workload would be; each round rewrites 1% of its memory."""

from __future__ import annotations

import os
import signal
import time
from typing import Protocol

from bench.harness import PY, launch
from checkpointer.workloads import process
from tests.support.net import free_port
from tests.support.redis_server import redis_client, redis_command


class Workload(Protocol):
    name: str
    pid: int  # the tree's root; set again after the benchmark's restores

    def mutate(self) -> None:
        """Rewrite 1% of its memory, between two checkpoints."""

    def alive_check(self) -> bool:
        """Whether it is alive and holds what it held (after the restores)."""


class Redis:
    def __init__(self, mb: int) -> None:
        self.port = free_port()
        self.mb = mb
        self.pid = launch(redis_command(self.port))
        self.client = redis_client(self.port, socket_timeout=60)
        self.keys = mb * 1024 * 1024 // 1200  # ~1.2 KB of RSS per 1000-byte value
        # Random hex values (they compress about 2:1, like real data rather than zeros).
        for start in range(0, self.keys, 20_000):
            pipe = self.client.pipeline(transaction=False)
            for i in range(start, min(start + 20_000, self.keys)):
                pipe.set(f"key:{i}", os.urandom(500).hex())
            pipe.execute()
        self.client.close()
        self.round = 0
        self.name = f"redis-{mb}MB"

    def mutate(self) -> None:
        """Rewrite 1% of the keys, spread over the whole key space."""
        self.round += 1
        pipe = self.client.pipeline(transaction=False)
        for i in range(self.round % 100, self.keys, 100):
            pipe.set(f"key:{i}", os.urandom(500).hex())
        pipe.execute()
        self.client.close()  # no established connection at dump time

    def alive_check(self) -> bool:
        try:
            return int(self.client.dbsize()) == self.keys
        finally:
            self.client.close()


class PyArray:
    """A Python process holding MB of random bytes; each round rewrites a 1% slice."""

    SRC = (
        "import os, signal, sys\n"
        "b = bytearray(os.urandom(int(sys.argv[1]) << 20))\n"
        "n = 0\n"
        "def touch(*_):\n"
        "    global n\n"
        "    n += 1\n"
        "    step = len(b) // 100\n"
        "    b[n % 100 * step:(n % 100 + 1) * step] = os.urandom(step)\n"
        "signal.signal(signal.SIGUSR1, touch)\n"
        "while True: signal.pause()\n"
    )

    def __init__(self, mb: int) -> None:
        self.pid = launch([PY, "-c", self.SRC, str(mb)])
        time.sleep(1 + mb / 200)
        self.name = f"python-bytearray-{mb}MB"

    def mutate(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)
        time.sleep(0.3)

    def alive_check(self) -> bool:
        return process.is_alive(self.pid)
