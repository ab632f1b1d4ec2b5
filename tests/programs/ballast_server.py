"""A counter server that also holds MB megabytes of random bytes in memory.

Its image is large and mostly incompressible, so uploads take a while (an outage can hit one
mid-way) and dedup has something to skip. GET /touch rewrites one page of the ballast,
GET /reshuffle all of it.
"""

import http.server
import os
import sys

count = 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        global count
        if self.path == "/touch":
            ballast[count * 4096 : count * 4096 + 16] = os.urandom(16)
        elif self.path == "/reshuffle":  # every page new: nothing of it dedups
            ballast[:] = os.urandom(len(ballast))
        count += 1
        body = f"{count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port, mb = int(sys.argv[1]), int(sys.argv[2])
    ballast = bytearray(os.urandom(mb * 1024 * 1024))
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
