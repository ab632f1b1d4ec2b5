"""Holds a file open for reading while it appends to it: the size CRIU records at every dump is
stale a moment later, so no checkpoint of it ever restores (its drills all fail).

argv: FILE."""

import sys
import time

path = sys.argv[1]
with open(path, "a", buffering=1) as out, open(path) as held:
    n = 0
    while True:
        n += 1
        out.write(f"line {n}\n")
        time.sleep(0.05)
