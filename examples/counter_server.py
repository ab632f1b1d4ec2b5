"""A stateful HTTP server: GET / returns how many requests it has served (held only in memory).

Used by the tests as the workload whose state must survive checkpoint and restore. It prints a
line per request, so tests can see its output reach the workload's log across a restore.
"""

import http.server
import sys

count = 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no idle TCP connection at dump

    def do_GET(self) -> None:
        global count
        count += 1
        body = f"{count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(f"served request {count}", flush=True)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    print(f"counter server listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
