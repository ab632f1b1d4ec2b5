"""A server whose accept loop is slow: it accepts one connection, closes it, and sleeps, so
clients that connect in a loop keep its accept queue rarely empty (CRIU refuses to dump a
listening socket with a queued connection: "In-flight connection"). Usage: PORT."""

import socket
import sys
import time

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(128)
while True:
    conn, _ = server.accept()
    conn.close()
    time.sleep(0.01)
