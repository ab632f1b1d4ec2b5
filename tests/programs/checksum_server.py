"""An HTTP server holding MB megabytes of bytes made from SEED, answering each GET with the
SHA-256 of all of them: a restored copy that got a page wrong (zeros for a page that never
came) keeps running and answers another digest, where Redis or Python objects would crash."""

import hashlib
import http.server
import random
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        body = (hashlib.sha256(ballast).hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port, mb, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    ballast = bytearray(b"".join(rng.randbytes(1 << 20) for _ in range(mb)))
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
