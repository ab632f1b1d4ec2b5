"""Restore drills: a checkpoint restored in a sandbox (real CRIU as root, on real process trees),
marked verified or bad, and what follows from the marks (retention, the restore policy, `list`,
`status`, metrics and the alert)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from checkpointer.api import Op
from checkpointer.cli.client import RemoteError, call
from checkpointer.config import Retention
from checkpointer.criu.sandbox import cgroup as sandbox_cgroup
from checkpointer.engine import WorkloadKind, tmpfs_scratch_root
from storage import marks
from storage.backends.local import LocalBlobStore
from storage.crypto import Sealed, new_master
from storage.keys import mark_key
from storage.retention import Item, decide
from tests.support import (
    COUNTER,
    PROGRAMS,
    Daemon,
    counter_started_elsewhere,
    free_port,
    http_get,
    kill_tree,
    serve,
    tree_pids,
)
from tests.test_metrics import ALERTS, Prometheus, scrape, value

CID = "20261123T162319.468074Z-79b328"


# -- the marks in the repository, and retention -----------------------------------------------


def test_a_mark_is_sealed_under_its_own_name_and_a_moved_or_forged_one_marks_nothing(
    tmp_path: Path,
) -> None:
    store, codec = LocalBlobStore(tmp_path), Sealed(new_master())
    other = "20261124T000000.000000Z-aaaaaa"
    marks.write(store, codec, "web", marks.Mark(CID, True, 1.0, "a", "", 0.5))
    assert marks.read(store, codec, "web") == {CID: marks.Mark(CID, True, 1.0, "a", "", 0.5)}
    # Copied under another checkpoint's name (whoever can write the bucket): does not open.
    store.put(mark_key("web", other), store.get(mark_key("web", CID)))
    # Written in clear, or sealed with another repository's key: neither opens.
    store.put(mark_key("web", "20261125T000000.000000Z-bbbbbb"), b'{"verified": true}')
    forged = Sealed(new_master())
    key = mark_key("web", "20261126T000000.000000Z-cccccc")
    store.put(key, forged.seal(key, marks.Mark(key[-30:], True, 1.0).to_json()))
    assert set(marks.read(store, codec, "web")) == {CID}
    # A failed drill replaces the verdict, reason kept on one line.
    marks.write(store, codec, "web", marks.Mark(CID, False, 2.0, "a", "bad\nsize " * 300))
    got = marks.read(store, codec, "web")[CID]
    assert not got.verified and "\n" not in got.why and len(got.why) == marks.MAX_WHY
    marks.remove(store, "web", {CID})
    assert marks.read(store, codec, "web") == {}


def test_retention_keeps_the_newest_verified_checkpoint_besides_its_rules() -> None:
    t0 = datetime(2026, 11, 23, 12, tzinfo=UTC)
    items = [Item(f"c{i}", t0 - timedelta(hours=i), 100) for i in range(5)]
    kept = {v.id: v.reasons for v in decide(Retention(keep_last=1), items) if v.keep}
    assert kept == {"c0": ["last"]}
    verdicts = decide(Retention(keep_last=1), items, verified=frozenset({"c2", "c3"}))
    kept = {v.id: v.reasons for v in verdicts if v.keep}
    assert kept == {"c0": ["last"], "c2": ["newest verified"]}
    # max_total_bytes never removes it either.
    verdicts = decide(
        Retention(keep_last=5, max_total_bytes=100), items, verified=frozenset({"c3"})
    )
    assert {v.id for v in verdicts if v.keep} == {"c3"}


# -- drills with real CRIU ---------------------------------------------------------------------


def drill(d: Daemon, name: str, checkpoint: str | None = None) -> dict[str, Any]:
    """`checkpointer drill NAME [ID] --json`: exit status 0 only when verified."""
    r = d.cli("drill", name, *([checkpoint] if checkpoint else []), "--json", check=False)
    assert r.returncode in (0, 1) and r.stdout, f"{r.stderr}\n{d.log.read_text()[-3000:]}"
    report: dict[str, Any] = json.loads(r.stdout)
    assert (r.returncode == 0) == (report["result"] == "verified"), report
    return report


@dataclass
class Counter:
    """The drill counter (tests/programs/drill_counter.py) run as a managed workload."""

    d: Daemon
    name: str
    port: int
    journal: Path
    state: Path
    socket: Path

    def ask_socket(self) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            return int(s.makefile().readline())


def start_counter(d: Daemon, name: str, *options: str) -> Counter:
    files = d.base / name
    files.mkdir()
    c = Counter(d, name, free_port(), files / "journal", files / "state", files / "sock")
    program = [sys.executable, str(PROGRAMS / "drill_counter.py"), str(c.port)]
    d.cli("run", name, *options, "--", *program, str(c.journal), str(c.state), str(c.socket))
    assert http_get(c.port) == "1"
    return c


def leftovers(d: Daemon) -> list[str]:
    """What a drill must not leave: a mount of its sandbox, a folder of its own, a process,
    a cgroup of its sandbox's (checkpointer/criu/sandbox/cgroup.py: named by the daemon's PID)."""
    found = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if "drill" in ln]
    for root in (d.state / "scratch", tmpfs_scratch_root(d.state)):
        found += [str(p) for p in root.glob("*-drill-*")] if root.exists() else []
    if d.proc is not None:
        mine = f"{sandbox_cgroup.PREFIX}{d.proc.pid}-*"
        found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"**/{mine}")]
    for entry in os.listdir("/proc"):  # the sandbox's processes: its PID 1 names its folder
        # (in the state folder, or on tmpfs when the image fits there)
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ours = str(d.state) in argv or str(tmpfs_scratch_root(d.state)) in argv
        if entry.isdigit() and "criu/sandbox/init.py" in argv and ours:
            found.append(f"pid {entry}: {argv}")
    return found


def test_a_checkpoint_that_restores_is_verified_and_the_live_tree_never_notices(
    daemon: Daemon,
) -> None:
    c = start_counter(daemon, "web", "--no-auto-restore")
    assert serve(c.port, 4) == "5"
    cid = daemon.checkpoint("web")
    live_pids = sorted(tree_pids(daemon.pid("web")))
    socket_inode = c.socket.stat().st_ino
    # The live tree answers all along: over TCP and over its unix socket, its count going on.
    answers: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            answers.append(int(http_get(c.port)))
            assert c.ask_socket() == answers[-1]

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        report = drill(daemon, "web")
    finally:
        stop.set()
        asker.join()
    assert report["result"] == "verified" and report["checkpoint"] == cid, report
    assert report["processes"] == 1 and not report["marked_bad"]
    assert len(answers) >= 3 and answers == list(range(6, 6 + len(answers))), answers
    # The live files: the journal has one line per request the live tree served, no more (the
    # restored copy never ran, and CRIU wrote nothing); the socket is the live tree's own.
    n = int(http_get(c.port))
    assert c.journal.read_text().splitlines() == [f"served {i}" for i in range(1, n + 1)]
    assert c.socket.stat().st_ino == socket_inode
    assert c.ask_socket() == n
    assert sorted(tree_pids(daemon.pid("web"))) == live_pids
    # Shown: `list` marks it verified, `status` says so and how old it is.
    listed = {e["id"]: e for e in daemon.json("list", "web")}
    assert listed[cid]["verified"] and listed[cid]["mark"] is None
    st = daemon.status("web")["drill"]
    assert st["last_result"] == "verified" and st["verified_checkpoint"] == cid
    assert 0 < st["verified_age_seconds"] < 120
    assert "verified" in daemon.cli("list", "web").stdout
    assert leftovers(daemon) == []


def test_a_checkpoint_whose_file_changed_fails_its_drill_and_a_crash_restores_the_one_before(
    daemon: Daemon,
) -> None:
    c = start_counter(daemon, "web")  # automatic restore on
    assert serve(c.port, 2) == "3"
    before = daemon.checkpoint("web")
    size = c.state.stat().st_size
    assert int(http_get(c.port, path="/grow")) > size
    assert serve(c.port, 2) == "5"
    bad = daemon.checkpoint("web")
    os.truncate(c.state, size)  # the file the tree holds open changed after the dump
    report = drill(daemon, "web")
    assert report["result"] == "failed" and report["marked_bad"], report
    assert report["checkpoint"] == bad and "changed since the checkpoint" in report["detail"]
    listed = {e["id"]: e for e in daemon.json("list", "web")}
    assert listed[bad]["mark"] == "bad" and not listed[bad]["verified"]
    why = listed[bad]["mark_reason"]
    assert why.startswith("its restore drill failed:") and "\n" not in why, why
    assert "has bad size" in why, why
    assert listed[before]["mark"] is None
    # A crash now: the policy skips the bad one without trying it, and restores the one before.
    kill_tree(daemon.pid("web"))
    st = daemon.wait_for("web", lambda s: s["state"] == "running" and s["restores"])
    assert http_get(c.port) == "4"  # the count of `before`, plus this request
    assert [(a["checkpoint"], a["result"]) for a in st["restores"]] == [(before, "ok")]
    assert leftovers(daemon) == []


def test_retention_keep_last_1_keeps_the_newest_verified_checkpoint_too(daemon: Daemon) -> None:
    c = start_counter(daemon, "web", "--no-auto-restore", "--keep-last", "1")
    first = daemon.checkpoint("web")
    assert drill(daemon, "web")["result"] == "verified"
    serve(c.port, 1)
    daemon.checkpoint("web")
    newest = daemon.checkpoint("web")
    assert [e["id"] for e in daemon.json("list", "web")] == [newest, first]
    assert drill(daemon, "web")["result"] == "verified"  # the newest, now verified too
    again = daemon.checkpoint("web")
    assert [e["id"] for e in daemon.json("list", "web")] == [again, newest]


def test_one_drill_of_a_workload_at_a_time_and_its_lock_free_while_criu_runs(
    daemon: Daemon,
) -> None:
    """A second drill of a workload whose drill runs is refused in one line; while the drill's
    CRIU runs in the sandbox the workload's lock is free (held only while the checkpoint is
    read), so its checkpoints and restores do not wait for it. The sandbox's CRIU runs at
    nice 19 and the lowest best-effort I/O level (the default: priority.py says why not
    SCHED_IDLE), as the daemon's thread that drills does (never SCHED_IDLE: it holds the
    workload's lock and the interpreter's), which is back to its priority afterwards."""
    port = free_port()
    ballast = [sys.executable, str(PROGRAMS / "ballast_server.py"), str(port), "200"]
    daemon.cli("run", "big", "--no-auto-restore", "--", *ballast)
    http_get(port, timeout=60)
    daemon.checkpoint("big")
    sock = daemon.state / "checkpointer.sock"
    assert daemon.proc is not None
    daemon_pid = daemon.proc.pid
    first: dict[str, Any] = {}
    t = threading.Thread(target=lambda: first.update(call(sock, Op.DRILL, name="big")))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not any("criu/sandbox/init.py" in p for p in _cmdlines()):  # CRIU in the sandbox now
            assert time.monotonic() < deadline and t.is_alive(), first
            time.sleep(0.01)
        # Straight to the daemon's socket: the CLI takes longer to start than this CRIU runs.
        with pytest.raises(RemoteError, match="a restore drill of big is already running"):
            call(sock, Op.DRILL, name="big")
        # The workload's lock is free: a checkpoint, a restore, would not wait for the drill.
        busy = call(sock, Op.STATUS, name="big")[0]["busy"]
        still = any("criu/sandbox/init.py" in p for p in _cmdlines())
        criu = None
        while criu is None and t.is_alive():
            criu = next(iter(_pids_of("--leave-stopped", "big-drill-")), None)
            time.sleep(0.005)
        priorities = (_priority(criu), _nice(criu), _ioprio_level(criu)) if criu else None
        drilling = {(_priority(tid), _nice(tid)) for tid in _threads(daemon_pid)}
    finally:
        t.join()
    assert first["result"] == "verified", first
    assert still and busy is False
    assert priorities == ((os.SCHED_OTHER, IOPRIO_CLASS_BE), 19, 7), (criu, priorities)
    assert ((os.SCHED_OTHER, IOPRIO_CLASS_BE), 10) in drilling, drilling
    assert all(p is None or p[0] != os.SCHED_IDLE for p, _ in drilling), drilling
    after = [(_priority(tid), _nice(tid)) for tid in _threads(daemon_pid)]
    assert all(nice in (0, None) for _, nice in after), after
    assert leftovers(daemon) == []


IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 2, 3


def _nice(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


def _priority(pid: int) -> tuple[int, int] | None:
    """(scheduling policy, I/O priority class) of a process or thread; None once it is gone."""
    try:
        policy = os.sched_getscheduler(pid)
    except OSError:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    ioprio = libc.syscall(252, 1, pid)  # ioprio_get(IOPRIO_WHO_PROCESS, pid), x86_64
    return policy, ioprio >> 13


def _ioprio_level(pid: int) -> int:
    """The level within its I/O class (0 highest, 7 lowest)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(252, 1, pid)) & 0xFF  # ioprio_get(IOPRIO_WHO_PROCESS, pid)


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def _pids_of(*words: str) -> list[int]:
    """Processes whose command line holds every one of `words`."""
    out = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            if entry.isdigit() and all(w in argv for w in words):
                out.append(int(entry))
    return out


def _cmdlines() -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"))
    return out


def test_an_adopted_tree_is_drilled_while_it_runs_its_pids_free_in_the_sandbox(
    daemon: Daemon,
) -> None:
    port = free_port()
    with counter_started_elsewhere(port) as proc:
        daemon.cli("register", "adopted", "--pid", str(proc.pid), "--no-auto-restore")
        assert serve(port, 2) == "3"
        daemon.checkpoint("adopted")
        report = drill(daemon, "adopted")
        assert report["result"] == "verified", report
        assert http_get(port) == "4" and proc.poll() is None
    assert leftovers(daemon) == []


def test_scheduled_drills_their_metrics_and_the_alert_for_a_workload_never_verified(
    workdir: Path,
) -> None:
    """drill.every from the config: a healthy counter is verified again and again and stays
    silent; a tree whose checkpoints never restore (tests/programs/growing_file.py) fails
    every drill and fires CheckpointerNoVerifiedCheckpoint in a real Prometheus; a workload
    without drills has no series. The shipped rule, its 2 days down to 60 s, `for:` to 1 s."""
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus package is missing: `make test` installs it")
    text = ALERTS.read_text()
    assert "checkpointer_verified_checkpoint_timestamp_seconds < 172800" in text
    rules = workdir / "alerts.yaml"
    rules.write_text(re.sub(r"for: \S+", "for: 1s", text.replace("< 172800", "< 60")))
    py, port, plain_port = sys.executable, free_port(), free_port()
    d = Daemon(
        workdir,
        f"""workloads:
  - name: good
    command: [{py}, "{COUNTER}", "{port}"]
    every: 2s
    drill: {{every: 3s}}
  - name: bad
    command: [{py}, "{PROGRAMS / "growing_file.py"}", "{workdir / "growing.txt"}"]
    every: 2s
    drill: {{every: 3s}}
    retention: {{keep_last: 100}}
  - name: plain
    command: [{py}, "{COUNTER}", "{plain_port}"]
    every: 2s
""",
    )
    d.start()
    cli_port = free_port()  # drills asked for on the command line, not in the config
    d.cli("run", "viacli", "--every", "2s", "--drill-every", "3s", "--", py, str(COUNTER),
          str(cli_port))  # fmt: skip
    prom = Prometheus(workdir, d.metrics_port, rules)
    try:
        deadline = time.monotonic() + 120
        while True:
            alerts = prom.api("alerts")["data"]["alerts"]
            firing = {
                a["labels"].get("workload")
                for a in alerts
                if a["labels"]["alertname"] == "CheckpointerNoVerifiedCheckpoint"
                and a["state"] == "firing"
            }
            good, viacli = d.status("good")["drill"], d.status("viacli")["drill"]
            bad = d.status("bad")["drill"]
            verified = good["last_result"] == viacli["last_result"] == "verified"
            failed = bad["last_result"] == "failed"
            if "bad" in firing and not {"good", "viacli"} & firing and verified and failed:
                break
            assert time.monotonic() < deadline, (alerts, good, viacli, bad)
            time.sleep(1)
        assert "plain" not in firing
        assert bad["verified_checkpoint"] is None, bad
        assert "has bad size" in bad["last_detail"]
        marked = [e for e in d.json("list", "bad") if e["mark"] == "bad"]
        assert marked and all("restore drill failed" in e["mark_reason"] for e in marked)
        m = scrape(d)
        assert value(m, "checkpointer_drills_total", workload="good", result="verified") >= 1
        assert value(m, "checkpointer_drills_total", workload="bad", result="failed") >= 1
        assert value(m, "checkpointer_drills_total", workload="plain", result="verified") == 0
        stamps = m["checkpointer_verified_checkpoint_timestamp_seconds"]
        assert {dict(k)["workload"] for k in stamps} == {"good", "viacli"}
        assert time.time() - 60 < min(stamps.values()) <= max(stamps.values()) <= time.time()
        intervals = {
            dict(k)["workload"]: v for k, v in m["checkpointer_drill_interval_seconds"].items()
        }
        assert intervals == {"good": 3, "bad": 3, "viacli": 3}
    finally:
        prom.stop()
        d.stop()


def test_the_shipped_alert_as_it_is_by_promtool(workdir: Path) -> None:
    """CheckpointerNoVerifiedCheckpoint with its 2 days and `for: 1h`, evaluated by promtool:
    fires for a workload never verified (after the hour) and for one whose newest verified
    checkpoint is over 2 days old; silent for one verified recently, and for one whose drills
    are off (no interval series) however old its verified checkpoint."""
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in rules["groups"][0]["rules"]:
        del rule["annotations"]  # promtool would compare every word of them
    (workdir / "alerts.yaml").write_text(yaml.safe_dump(rules))
    interval = "checkpointer_drill_interval_seconds{{instance='h',workload='{}'}}"
    verified = "checkpointer_verified_checkpoint_timestamp_seconds{{instance='h',workload='{}'}}"
    tests = workdir / "alerts-test.yaml"
    tests.write_text(
        f"""
rule_files: [{workdir / "alerts.yaml"}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - {{series: "{interval.format("fresh")}", values: '86400x4000'}}
      - {{series: "{interval.format("proven")}", values: '86400x4000'}}
      - {{series: "{verified.format("proven")}", values: '170000x4000'}}
      - {{series: "{interval.format("stale")}", values: '86400x4000'}}
      - {{series: "{verified.format("stale")}", values: '0x4000'}}
      - {{series: "{verified.format("off")}", values: '0x4000'}}
    alert_rule_test:
      - eval_time: 30m
        alertname: CheckpointerNoVerifiedCheckpoint
        exp_alerts: []
      - eval_time: 50h
        alertname: CheckpointerNoVerifiedCheckpoint
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h, workload: fresh}}
          - exp_labels: {{severity: warning, instance: h, workload: stale}}
"""
    )
    r = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_drills_and_their_policy_survive_the_registry() -> None:
    """What a restarted daemon reads back: the drill policy, the drills, the newest verified
    one kept past the history's length."""
    from checkpointer.config import DrillPolicy
    from checkpointer.engine.registry import from_json, to_json
    from checkpointer.engine.workload import HISTORY, DrillRecord, DrillResult, Workload

    w = Workload("web", WorkloadKind.MANAGED, command=["x"], drill=DrillPolicy(every=86400))
    w.record_drill(DrillRecord(1.0, CID, 0.5, DrillResult.VERIFIED, "ok", 1.5))
    for i in range(HISTORY + 5):
        w.record_drill(DrillRecord(2.0 + i, CID, 0.5, DrillResult.ERROR, "storage down", 0.1))
    assert len(w.drills) == HISTORY and w.verified() == w.drills[0]
    back = from_json(json.loads(json.dumps(to_json(w))))
    assert back.drill.every == 86400 and back.drills == w.drills
    back.mark_bad(CID)
    assert back.verified() is None
