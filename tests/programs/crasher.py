"""A counter server that crashes on purpose: DELAY seconds after its count reaches CRASH_AT.

The armed timer is part of its memory, so a checkpoint taken after the count reached CRASH_AT
holds the crash too: restoring it crashes again. That is the crash loop the daemon must step
back from.
"""

import http.server
import os
import sys
import threading
import time

count = 0


def crash_later(delay: float) -> None:
    time.sleep(delay)
    print(f"crashing on purpose at count {count}", flush=True)
    os._exit(3)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        global count
        count += 1
        if count == CRASH_AT:
            threading.Thread(target=crash_later, args=(DELAY,), daemon=True).start()
        body = f"{count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port, CRASH_AT, DELAY = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
