"""Holds an established TCP connection to itself: CRIU refuses to dump it without
--tcp-established, so every checkpoint of this workload fails (for the alert tests)."""

import socket
import time

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
client = socket.create_connection(server.getsockname())
conn, _ = server.accept()
while True:
    time.sleep(3600)
