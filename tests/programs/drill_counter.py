"""The restore drills' workload: a counter whose state is in memory, with files and a unix
socket a careless restore would touch.

argv: PORT JOURNAL STATE SOCKET. GET / counts a request, appends "served N" to JOURNAL
(opened append-only: CRIU does not check its size) and answers N. GET /grow appends a record
to STATE, a file held open read-write (CRIU checks its size on restore). SOCKET is a unix
socket listening by path: each connection gets the current count.
"""

import http.server
import os
import socket
import sys
import threading

count = 0
lock = threading.Lock()
port, journal_path, state_path, socket_path = sys.argv[1:5]
journal = open(journal_path, "a", buffering=1)  # noqa: SIM115 - held for the process's life
state = os.open(state_path, os.O_RDWR | os.O_CREAT, 0o600)


def serve_unix() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        s.bind(socket_path)
        s.listen(16)
        while True:
            conn, _ = s.accept()
            with conn, lock:
                conn.sendall(f"{count}\n".encode())


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        global count
        with lock:
            if self.path == "/grow":
                os.lseek(state, 0, os.SEEK_END)
                os.write(state, f"record at {count}\n".encode())
                body = f"{os.fstat(state).st_size}\n".encode()
            else:
                count += 1
                journal.write(f"served {count}\n")
                body = f"{count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


threading.Thread(target=serve_unix, daemon=True).start()
http.server.HTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
