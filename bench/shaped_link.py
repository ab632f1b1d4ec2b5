"""A network link of a given rate between this process and a server: a veth pair to a network
namespace the bench makes, with a token-bucket filter (tc tbf) on the server's side, so what
the server sends (a download) leaves at that rate. It stands in for the host's link to a
remote S3 endpoint, which loopback does not have. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.support.hosts import free_subnet, ip


@dataclass(frozen=True)
class Link:
    netns: str  # where the server runs
    server: str  # its address, reached over the link
    mbit: int


def available() -> str:
    """Why a shaped link cannot be made here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc): apt-get install iproute2"
    return ""


@contextmanager
def shaped_link(mbit: int) -> Iterator[Link]:
    """The link for as long as the block runs; the namespace and the veth are removed after."""
    tag = f"ckbd{os.getpid() % 100000}"
    subnet = free_subnet()
    ip("netns", "add", tag)
    try:
        ip("link", "add", tag, "type", "veth", "peer", "name", "eth0", "netns", tag)
        ip("addr", "add", f"{subnet}.1/30", "dev", tag)
        ip("link", "set", tag, "up")
        ip("-n", tag, "link", "set", "lo", "up")
        ip("-n", tag, "addr", "add", f"{subnet}.2/30", "dev", "eth0")
        ip("-n", tag, "link", "set", "eth0", "up")
        # burst: at least a timer tick's worth of bytes at this rate, or tbf undershoots it.
        burst = max(64 * 1024, mbit * 1_000_000 // 8 // 250)
        ip("netns", "exec", tag, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
           "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms")  # fmt: skip
        yield Link(netns=tag, server=f"{subnet}.2", mbit=mbit)
    finally:
        ip("link", "del", tag, check=False)
        ip("netns", "del", tag, check=False)
