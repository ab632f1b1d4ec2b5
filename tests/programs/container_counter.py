"""The counter server as a container's init: counts requests in memory, standard library only
(the test rootfs has python3-minimal). Optional ballast of MB megabytes of random bytes.

GET /touch changes one page in every MB of the ballast; GET /write/NAME writes the current
count to /srv/NAME in the container's rootfs. In an LXC
container with an empty network the loopback starts down: it brings it up itself.
"""

import fcntl
import os
import socket
import struct
import sys

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    with socket.socket() as s:
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req)[:18])[1]
        if not flags & IFF_UP:  # Podman's containers have it up (and no CAP_NET_ADMIN)
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def main() -> None:
    port = int(sys.argv[1])
    ballast = bytearray(os.urandom(int(sys.argv[2]) * 1024 * 1024)) if len(sys.argv) > 2 else b""
    assert ballast is not None  # held in memory: that is its point
    loopback_up()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    count = 0
    while True:
        conn, _ = server.accept()
        with conn:
            line = conn.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
            path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
            count += 1
            if path == "/touch":  # one page of every MB of the ballast changes
                for i in range(0, len(ballast), 1 << 20):
                    ballast[i : i + 16] = os.urandom(16)
            if path.startswith("/write/"):
                with open("/srv/" + os.path.basename(path), "w") as f:
                    f.write(f"{count}\n")
            body = f"{count}\n".encode()
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            conn.sendall(head + body)


if __name__ == "__main__":
    main()
