"""The counter server (examples/counter_server.py), started as packaged daemons start: it binds
its port and opens a root-only file as root, keeps the file open, then switches to user
`nobody` and serves, counting requests in memory.

    user_switching_counter.py PORT ROOT_ONLY_FILE
"""

import http.server
import os
import pwd
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from counter_server import Handler  # the handler every counter test uses

server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
held = open(sys.argv[2])  # noqa: SIM115 - kept open, as a daemon keeps its log or key file
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
print(f"listening on {sys.argv[1]} as uid {os.geteuid()}", flush=True)
server.serve_forever()
