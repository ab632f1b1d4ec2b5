"""A process holding MB megabytes of bytes made from SEED that, once GO exists, daemonizes
grandchildren in a loop as fast as it can, or as GO says ("COUNT PAUSE [HOLD]": how many, the
seconds between two, and how long the child waits before it exits) (fork, the child forks again
and exits, at once by default: each grandchild is re-parented out of this process's tree within
a millisecond or so; `criu lazy-pages` itself crashes at times on a fork racing an exit, which a
HOLD of a few tens of milliseconds avoids for a test that needs the transfer to finish).

Every process it makes, itself included, appends its PID to PIDLOG first, so that a test
can check each one (its start time, read from outside: a restored process may see its own in
a time namespace of CRIU's). Each grandchild
then reads one byte of a page of the ballast every 20 ms, for as long as it lives. At most
LIMIT grandchildren: a test that fails must not fill the host with them. "peek" on PORT
answers one line (the ballast's digest), as the other test programs do.
"""

import hashlib
import os
import random
import socket
import sys
import threading
import time

LIMIT = 300


def log(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def serve(port: int, chunks: list[bytes]) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.recv(64)
            h = hashlib.sha256()
            for c in chunks:
                h.update(c[::4096])
            conn.sendall(h.hexdigest().encode() + b"\n")


def linger(chunks: list[bytes]) -> None:
    rng = random.Random(os.getpid())
    while True:
        c = chunks[rng.randrange(len(chunks))]
        _ = c[rng.randrange(len(c))]
        time.sleep(0.02)


def main() -> None:
    port, mb, seed, pidlog, go = sys.argv[1:6]
    rng = random.Random(int(seed))
    chunks = [rng.randbytes(1 << 20) for _ in range(int(mb))]
    threading.Thread(target=serve, args=(int(port), chunks), daemon=True).start()
    while not os.path.exists(go):
        time.sleep(0.01)
    log(pidlog)
    with open(go) as f:
        words = f.read().split()
    count, pause = (int(words[0]), float(words[1])) if words else (LIMIT, 0.0)
    hold = float(words[2]) if len(words) > 2 else 0.0
    for _ in range(min(count, LIMIT)):
        time.sleep(pause)
        child = os.fork()
        if child == 0:
            log(pidlog)
            if os.fork() == 0:
                os.setsid()
                log(pidlog)
                linger(chunks)
            time.sleep(hold)
            os._exit(0)
        os.waitpid(child, 0)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
