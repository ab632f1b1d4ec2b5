"""A server holding MB megabytes of bytes made from SEED that starts a daemon on request.

On its PORT: "peek" answers the sha256 of one byte of every page of them (zeros for a page
that never came give another digest), "daemonize N" starts a daemon the classic way (fork,
the child forks again and exits: the grandchild is re-parented out of this process's tree)
which answers the same on port N, and "pid" with its PID as /proc sees it (the host's, in a
PID namespace of its own with the host's /proc); anything else "pong".

The daemon's parent lingers 0.3 s before it exits, long enough to be seen in the tree by one
who looks every 50 ms, as the lazy restore's guard does (checkpointer.criu.lazy.restored_tree).
"""

import hashlib
import os
import random
import socket
import sys
import time


def peek(chunks: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c[::4096])
    return h.hexdigest().encode() + b"\n"


def serve(port: int, chunks: list[bytes]) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = srv.accept()
        with conn:
            what = conn.recv(64)
            if what.startswith(b"peek"):
                conn.sendall(peek(chunks))
            elif what.startswith(b"pid"):
                conn.sendall(os.readlink("/proc/self").encode() + b"\n")
            elif what.startswith(b"daemonize "):
                if os.fork() == 0:
                    srv.close()
                    conn.close()  # the client sees the end of the answer only once all close
                    if os.fork() == 0:
                        os.setsid()
                        serve(int(what.split()[1]), chunks)
                    time.sleep(0.3)
                    os._exit(0)
                os.wait()
                conn.sendall(b"ok\n")
            else:
                conn.sendall(b"pong\n")


if __name__ == "__main__":
    port, mb, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    serve(port, [rng.randbytes(1 << 20) for _ in range(mb)])
