"""An HTTP server that answers each GET with the value of one environment variable and how many
requests it has served: "VALUE COUNT". A workload that moves between hosts must keep both, its
count (memory, in the image) and its environment (the option that travels with it).

    python env_counter.py PORT VARIABLE
"""

import http.server
import os
import sys

count = 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no idle TCP connection at dump

    def do_GET(self) -> None:
        global count
        count += 1
        body = f"{os.environ.get(variable, '-')} {count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port, variable = int(sys.argv[1]), sys.argv[2]
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
