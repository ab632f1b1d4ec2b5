"""Hand freed buffers back to the kernel, so that the daemon's RSS follows what it uses.

A checkpoint allocates and frees megabyte buffers (pack contents, compressed packs, CRIU
statistics, manifests). glibc serves big blocks with mmap, but after the first one is freed it
raises its mmap threshold to that block's size (up to 32 MiB), so later packs come from the
heap and stay resident when freed: measured on a 1 GB checkpoint, 20-40 MB more peak RSS.
Fixing the threshold turns that adjustment off; two arenas stop every pack-writer thread from
growing an arena of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_heap_small() -> bool:
    """Tune glibc's malloc; False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    ok &= mallopt(_M_TRIM_THRESHOLD, 1024 * 1024)
    ok &= mallopt(_M_ARENA_MAX, 2)
    return bool(ok)
