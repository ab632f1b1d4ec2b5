"""A workload with a child process and worker threads, each holding its own in-memory count.

GET / makes the parent, its child process (over a pipe) and a worker thread (over a queue)
each add one to their own counter, and returns "parent child thread". After a restore the three
must carry on from the checkpointed values: the whole tree came back, threads included.
"""

import http.server
import os
import queue
import sys
import threading

requests: "queue.Queue[None]" = queue.Queue()
replies: "queue.Queue[int]" = queue.Queue()


def worker() -> None:
    n = 0
    while True:
        requests.get()
        n += 1
        replies.put(n)


def child_loop(r: int, w: int) -> None:
    n = 0
    while os.read(r, 1):
        n += 1
        os.write(w, f"{n}\n".encode())


def main() -> None:
    port = int(sys.argv[1])
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    if os.fork() == 0:
        child_loop(to_child_r, from_child_w)
        os._exit(0)
    threading.Thread(target=worker, daemon=True).start()
    threading.Thread(target=threading.Event().wait, daemon=True).start()  # an idle thread
    from_child = os.fdopen(from_child_r, "r")
    state = {"parent": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            with lock:
                state["parent"] += 1
                os.write(to_child_w, b"x")
                child = int(from_child.readline())
                requests.put(None)
                thread = replies.get()
                body = f"{state['parent']} {child} {thread}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
