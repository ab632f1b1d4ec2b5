"""Holds a secret in memory only: argv carries it reversed, the process keeps it the right way
round (so the marker exists nowhere but in this process's pages). GET / answers "ready"."""

import http.server
import sys

SECRET = [sys.argv[2][::-1].encode() * 64]  # 64 copies: several pages hold it


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        body = b"ready\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
