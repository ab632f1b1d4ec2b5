"""Extra CRIU options (criu.extra_options, --criu-opt): an allow-list, validated, passed as
separate argv elements to the runs they apply to; and end to end, an option CRIU needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkpointer.config import CriuOptions
from checkpointer.criu import CriuError, DumpOptions
from checkpointer.criu.driver import restore_argv
from checkpointer.criu.options import ALLOWED_EXTRA_OPTIONS, check_extra_options, extra_argv
from checkpointer.engine.registry import from_json, to_json
from checkpointer.engine.workload import Workload, WorkloadKind
from tests.support import Daemon, free_port, http_get, kill_tree, serve


@pytest.mark.parametrize(
    "given,canonical",
    [
        (["--manage-cgroups"], ["--manage-cgroups"]),
        (["--manage-cgroups=full"], ["--manage-cgroups=full"]),
        (["--manage-cgroups", "soft"], ["--manage-cgroups=soft"]),  # a bare word: its value
        (["--ghost-limit", "8M"], ["--ghost-limit=8M"]),
        (["--ghost-limit 8M"], ["--ghost-limit=8M"]),
        (["--manage-cgroups  full"], ["--manage-cgroups=full"]),
        ([" --ghost-limit=1048576 "], ["--ghost-limit=1048576"]),
        (["--irmap-scan-path=/srv/a b"], ["--irmap-scan-path=/srv/a b"]),
        (["--irmap-scan-path", "/srv"], ["--irmap-scan-path=/srv"]),
        (["--force-irmap"], ["--force-irmap"]),
        (
            ["--file-validation", "filesize", "--weak-sysctls"],
            ["--file-validation=filesize", "--weak-sysctls"],
        ),
        ([], []),
    ],
)
def test_allowed_forms_become_canonical(given: list[str], canonical: list[str]) -> None:
    assert check_extra_options(given) == canonical
    assert check_extra_options(canonical) == canonical  # stored form validates unchanged


@pytest.mark.parametrize(
    "option,why",
    [
        ("--images-dir=/x", "the service chooses where images go"),
        ("-D", "the service chooses where images go"),
        ("-D/x", "the service chooses where images go"),
        ("--work-dir=/x", "logs, pidfile and statistics"),
        ("-W", "logs, pidfile and statistics"),
        ("--tree=1", "the workload's PID"),
        ("-t", "the workload's PID"),
        ("--restore-detached", "restores detached"),
        ("-d", "restores detached"),
        ("--leave-running", "leaves the tree running"),
        ("-R", "leaves the tree running"),
        ("--log-file=/x", "keeps CRIU's log"),
        ("-o", "keeps CRIU's log"),
        ("-v4", "logs at -v4"),
        ("-vvv", "logs at -v4"),
        ("--verbosity=1", "logs at -v4"),
        ("--pidfile=/x", "own pidfile"),
        ("--exec-cmd", "reap it"),
        ("--action-script=/bin/sh", "runs a program as root"),
        ("--prev-images-dir=../x", "full image"),
        ("--track-mem", "full image"),
        ("--auto-dedup", "full image"),
        ("--lazy-pages", "lazy-pages daemon"),
        ("--inherit-fd=fd[3]:x", "no file descriptors"),
        ("--display-stats", "statistics images"),
        ("-j", "criu.shell_job: true"),
        ("--shell-job", "criu.shell_job: true"),
        ("--tcp-established", "criu.tcp_established: true"),
        ("--config=/etc/x", "past this allow-list"),
        ("--link-remap", "can never be restored"),
    ],
)
def test_refused_options_say_why(option: str, why: str) -> None:
    with pytest.raises(ValueError) as e:
        check_extra_options([option])
    msg = str(e.value)
    assert f"CRIU option {option.split('=')[0]} is refused" in msg and why in msg, msg


@pytest.mark.parametrize("option", ["--bogus", "--no-link-remap", "--root=/", "--libdir=/tmp"])
def test_unknown_options_list_the_allowed_ones(option: str) -> None:
    with pytest.raises(ValueError) as e:
        check_extra_options([option])
    msg = str(e.value)
    assert f"CRIU option {option.split('=')[0]} is not allowed; allowed: " in msg
    assert all(name in msg for name in ALLOWED_EXTRA_OPTIONS)


@pytest.mark.parametrize(
    "items,problem",
    [
        (["--force-irmap=1"], "takes no value"),
        (["--ghost-limit"], "needs a value"),
        (["--ghost-limit", "--force-irmap"], "needs a value"),
        (["--ghost-limit=1MiB"], "not a size as CRIU reads it"),
        (["--ghost-limit=-1"], "not a size as CRIU reads it"),
        (["--ghost-limit=99999999999G"], "too large"),
        (["--ghost-limit 8M --force-irmap"], "not a size as CRIU reads it"),
        (["--force-irmap --ghost-fiemap"], "one CRIU option per item"),
        (["--manage-cgroups=bogus"], "'bogus' is not one of none, props, soft"),
        (["--irmap-scan-path=relative/dir"], "not an absolute path"),
        (["--file-validation=none"], "is not one of filesize, buildid"),
        (["soft"], "is not a CRIU option"),
        (["--force-irmap", "--force-irmap"], "given twice"),
        (["--manage-cgroups", "--manage-cgroups=full"], "given twice"),
        ([3], "is not a CRIU option"),
        (["--irmap-scan-path=/a\0b"], "NUL"),
    ],
)
def test_bad_values(items: list[object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_extra_options(items)


def test_argv_per_run_keeps_values_separate() -> None:
    opts = DumpOptions(
        file_locks=True,
        extra_options=(
            "--manage-cgroups=full",
            "--ghost-limit=8M",
            "--irmap-scan-path=/srv/a b",
            "--force-irmap",
            "--weak-sysctls",
        ),
    )
    # getopt takes an optional value only attached; a required one is its own element
    assert opts.extra_args("dump") == [
        "--manage-cgroups=full",
        "--ghost-limit",
        "8M",
        "--irmap-scan-path",
        "/srv/a b",
        "--force-irmap",
    ]
    assert opts.extra_args("restore") == ["--manage-cgroups=full", "--weak-sysctls"]
    assert opts.common_args() == ["--file-locks"]
    assert extra_argv(["--manage-cgroups"], "restore") == ["--manage-cgroups"]
    with pytest.raises(CriuError) as e:
        DumpOptions(extra_options=("--pidfile=/x",)).extra_args("dump")
    assert e.value.category == "bad-option"


def test_a_lazy_restore_passes_the_same_options_as_a_full_one() -> None:
    """One command line for both restores: a workload option a lazy restore dropped (its
    TCP connections, its extra options, the files it inherits) would fail only there."""
    opts = DumpOptions(tcp_established=True, tcp_close=True, extra_options=("--weak-sysctls",))
    where = (Path("/s/img"), Path("/s/img.pid"), Path("/s/img.restore.log"))
    inherit = [(7, "pipe[123]")]
    full = restore_argv("criu", *where, opts, inherit)
    lazy = restore_argv("criu", *where, opts, inherit, lazy=True)
    assert [a for a in lazy if a != "--lazy-pages"] == full
    assert lazy.count("--lazy-pages") == 1 and "--lazy-pages" not in full
    for arg in ("--tcp-established", "--tcp-close", "--weak-sysctls", "fd[7]:pipe[123]"):
        assert arg in full
    assert full[full.index("--images-dir") + 1] == "/s/img"
    assert full[full.index("--pidfile") + 1] == "/s/img.pid"


def test_registry_keeps_the_options() -> None:
    criu = CriuOptions.model_validate({"extra_options": ["--ghost-limit 8M", "--manage-cgroups"]})
    w = Workload(name="w", kind=WorkloadKind.MANAGED, command=["x"], criu=criu)
    back = from_json(json.loads(json.dumps(to_json(w))))
    assert back.criu.extra_options == ["--ghost-limit=8M", "--manage-cgroups"]
    assert back.dump_options().extra_args("dump") == ["--ghost-limit", "8M", "--manage-cgroups"]
    old = to_json(w)
    del old["criu"]["extra_options"]  # a registry written before the key existed
    assert from_json(old).criu.extra_options == []


def test_this_criu_parses_every_allowed_option() -> None:
    """Names and value forms as this CRIU's getopt reads them (`criu check` parses them all
    and fails on an unknown one with a usage error)."""
    values = {"--irmap-scan-path": "/", "--ghost-limit": "2M", "--file-validation": "filesize"}
    items = [f"{n}={values[n]}" if n in values else n for n in ALLOWED_EXTRA_OPTIONS]
    canonical = check_extra_options(items)
    for argv in (extra_argv(canonical, "dump"), extra_argv(canonical, "restore")):
        r = subprocess.run(["criu", "check", *argv], capture_output=True, text=True, timeout=120)
        assert "Unknown option" not in r.stderr + r.stdout and "Usage" not in r.stdout, r
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
    r = subprocess.run(["criu", "check", "--no-such-option"], capture_output=True, text=True)
    assert r.returncode != 0  # the check above would see a bad one


# Holds open a 3 MiB file it deleted (a "ghost" file): CRIU saves such a file's contents into
# the image only up to --ghost-limit (1M by default), so the dump fails without the option.
GHOST = """
import hashlib, http.server, os, sys
path = os.path.join(sys.argv[2], "scratch.bin")
f = open(path, "w+b")
f.write(os.urandom(3 << 20)); f.flush()
os.unlink(path)
count = 0
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        global count
        count += 1
        body = f"{count} {hashlib.sha256(os.pread(f.fileno(), 4 << 20, 0)).hexdigest()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_ghost_limit_reaches_criu_on_dump_and_the_tree_restores(
    daemon: Daemon, workdir: Path
) -> None:
    prog = workdir / "ghost.py"
    prog.write_text(GHOST)
    files = workdir / "files"
    files.mkdir()

    # Without the option: every dump fails, and the error says which option to use.
    port = free_port()
    daemon.cli(
        "run",
        "plain",
        "--no-auto-restore",
        "--cwd",
        str(workdir),
        "--",
        sys.executable,
        str(prog),
        str(port),
        str(files),
    )
    http_get(port)
    r = daemon.cli("checkpoint", "plain", check=False)
    assert r.returncode != 0
    assert "Can't dump ghost file" in r.stderr and "--ghost-limit=" in r.stderr, r.stderr
    daemon.cli("unregister", "plain")

    # With it (CLI form with a space), the same tree checkpoints and comes back exactly.
    port = free_port()
    daemon.cli(
        "run",
        "ghost",
        "--no-auto-restore",
        "--cwd",
        str(workdir),
        "--criu-opt",
        "--ghost-limit 16M",
        "--criu-opt",
        "--manage-cgroups=soft",
        "--",
        sys.executable,
        str(prog),
        str(port),
        str(files),
    )
    first = http_get(port)
    digest = first.split()[1]
    assert serve(port, 4).split() == ["5", digest]
    daemon.checkpoint("ghost")
    assert serve(port, 3).split() == ["8", digest]
    kill_tree(daemon.pid("ghost"))
    daemon.cli("restore", "ghost")
    assert http_get(port).split() == ["6", digest]  # memory and the deleted file's contents

    registry = json.loads((daemon.state / "workloads.json").read_text())
    (w,) = [w for w in registry["workloads"] if w["name"] == "ghost"]
    assert w["criu"]["extra_options"] == ["--ghost-limit=16M", "--manage-cgroups=soft"]
    assert list(files.iterdir()) == []  # nothing left behind by CRIU


def test_register_takes_criu_opt(daemon: Daemon) -> None:
    from tests.support import counter_started_elsewhere

    port = free_port()
    with counter_started_elsewhere(port) as proc:
        daemon.cli(
            "register",
            "adopted",
            "--no-auto-restore",
            "--pid",
            str(proc.pid),
            "--criu-opt",
            "--manage-cgroups=soft",
            "--criu-opt",
            "--skip-in-flight",
        )
        assert serve(port, 2) == "3"
        daemon.checkpoint("adopted")
        serve(port, 2)
        proc.kill()
        proc.wait()
        daemon.cli("restore", "adopted")
        assert http_get(port) == "4"
    r = daemon.cli("register", "x", "--pid", "1", "--criu-opt", "--tree=1", check=False)
    assert r.returncode == 2 and "CRIU option --tree is refused" in r.stderr
