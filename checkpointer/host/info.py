"""Facts about this host that go into every checkpoint's metadata."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id. CHECKPOINTER_BOOT_ID_FILE points elsewhere, so tests can fake a reboot."""
    path = Path(os.environ.get("CHECKPOINTER_BOOT_ID_FILE", BOOT_ID_FILE))
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


def host_facts() -> dict[str, str]:
    return {"host": socket.gethostname(), "boot_id": boot_id(), "kernel": platform.release()}
