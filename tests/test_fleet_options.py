"""A workload that moves keeps its options: schedule, retention, restore policy, env and CRIU
options travel in its checkpoints' metadata (checkpointer/engine/spec.py), so the host that
takes it over (migration, failover, `restore NAME`) runs it exactly as the old one did.

The end-to-end test runs real daemons in hosts of their own (tests/support/hosts.py) on one
moto bucket, as tests/test_fleet.py does; the unit tests read specs as the hostile input they
are (a manifest is written by whoever holds the repository's key)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from checkpointer.config import Config, CriuOptions, RestorePolicy, Retention, WorkloadOptions
from checkpointer.daemon.main import services
from checkpointer.engine import Engine, spec
from checkpointer.engine.registry import from_json, to_json
from checkpointer.engine.workload import Workload, WorkloadKind, WorkloadState
from checkpointer.errors import RestoreFailed
from tests.support import PROGRAMS, Host, Network
from tests.test_engine_policy import FakeCriu, FakeCriuProcs, sleeper
from tests.test_engine_policy import _reap_sleepers as _reap_sleepers  # autouse: kills them
from tests.test_engine_policy import setup as setup  # the fixture: an engine, a fake CRIU
from tests.test_fleet import fleet, until

ENV_COUNTER = PROGRAMS / "env_counter.py"


def _checkpoints_by(host: Host, name: str) -> list[dict[str, Any]]:
    return [c for c in host.json("list", name) if c["host"] == host.name]


def _running(host: Host, name: str) -> bool:
    """Whether `name` is registered on `host` (a host registers what it takes over) and runs."""
    return any(w["name"] == name and w["state"] == "running" for w in host.json("status"))


def _runs_as_before(host: Host, name: str, schedule: str, port: int, colour: str) -> None:
    """On `host`: shows the same schedule, checkpoints on it by itself (three new ones), keeps
    at most two, and its process sees the env."""
    st = host.status(name)
    assert st["schedule"] == schedule and st["next_checkpoint"], st
    assert host.http_get(port).startswith(f"{colour} "), host.log.read_text()[-3000:]
    seen: set[str] = set()

    def three_new() -> bool:
        seen.update(c["id"] for c in _checkpoints_by(host, name))
        return len(seen) >= 3

    until(f"{name} is checkpointed every 2s on {host.name}", three_new, 30, host)
    # keep_last 2 (the newest good one is kept anyway: it is one of the two). A listing may
    # fall between a commit and the retention after it: wait for the settled count.
    until(f"{name} keeps 2 on {host.name}", lambda: len(host.json("list", name)) <= 2, 10, host)


def test_a_workload_keeps_schedule_retention_and_env_through_migrate_and_failover(
    workdir: Path,
) -> None:
    port = 18085
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-fleet-o-{os.getpid()}")
        a = fleet(net, bucket, "a", False, None)
        a.start()
        b = fleet(net, bucket, "b", False, a.key_file)
        b.start()
        c = fleet(net, bucket, "c", True, a.key_file)  # the only host that fails over
        c.start()
        a.cli(
            *("run", "web", "--every", "2s", "--keep-last", "2", "--env", "CKPT_COLOUR=teal"),
            *("--", sys.executable, str(ENV_COUNTER), str(port), "CKPT_COLOUR"),
        )
        assert a.serve(port, 3) == "teal 3"
        schedule = a.status("web")["schedule"]
        assert "2" in schedule, schedule

        a.json("migrate", "web", "--to", "b")
        st = b.wait_for("web", lambda s: s["state"] == "running", timeout=30)
        assert st["restores"][-1]["reason"] == "migration"
        assert b.http_get(port) == "teal 4"  # its count, and its env
        _runs_as_before(b, "web", schedule, port, "teal")
        a.stop()  # done with A: less for the two cores to do

        time.sleep(2.5)  # the spool uploads B's latest checkpoints
        b.kill9()  # B dies: C, which never knew web, takes it over from the bucket
        until("C took web over", lambda: _running(c, "web"), 40, c)
        assert c.status("web")["restores"][-1]["reason"] == "failover"
        _runs_as_before(c, "web", schedule, port, "teal")


# -- the spec, read as hostile input ------------------------------------------------------------

CONFIG = Config()


def _workload() -> Workload:
    w = Workload(name="web", kind=WorkloadKind.MANAGED, command=["srv", "8080"], cwd="/srv")
    w.every, w.jitter = 2.0, 0.5
    w.env = {"CKPT_COLOUR": "teal", "EMPTY": ""}
    w.criu = CriuOptions(tcp_established=True, extra_options=["--ghost-limit=64M"])
    w.retention = Retention(keep_last=2, keep_within=3600.0)
    w.restore = RestorePolicy(lazy=True, max_depth=2, on_clean_exit=True)
    return w


def _metadata(w: Workload, **spec_changes: Any) -> dict[str, Any]:
    s = spec.describe(w, "/var/lib/checkpointer/logs/web.fifo")
    return {"spec": {**s, **spec_changes}}


def test_options_round_trip_through_the_spec() -> None:
    w = _workload()
    s = spec.read(_metadata(w), "web", "X")
    assert s.carried and s.problem is None
    assert (s.kind, s.command, s.cwd, s.container) == (w.kind, w.command, w.cwd, None)
    assert s.log_fifo == "/var/lib/checkpointer/logs/web.fifo"
    assert s.env == w.env
    o = s.options
    assert (o.every, o.cron, o.jitter) == (2.0, None, 0.5)
    assert o.criu == w.criu and o.retention == w.retention and o.restore == w.restore
    # Everything the registry keeps of a workload's options travels: one list for both.
    moved = Workload(name="web", kind=s.kind, command=s.command, cwd=s.cwd, env=s.env)
    from checkpointer.engine.facade import with_options

    with_options(moved, o, CONFIG)
    keys = set(spec.options_json(w))
    assert {k: v for k, v in to_json(moved).items() if k in keys} == spec.options_json(w)
    assert keys <= set(to_json(w)) and from_json(to_json(w)).env == w.env


def test_an_old_manifest_without_options_reads_as_before() -> None:
    old = {"kind": "managed", "command": ["srv"], "cwd": "/", "criu": {"file_locks": True}}
    s = spec.read({"spec": old}, "web", "X")
    assert not s.carried and s.problem is None and s.env == {}
    assert s.options == WorkloadOptions(criu=CriuOptions(file_locks=True))
    s = spec.read({}, "web", "X")  # before specs were written at all
    assert s.kind is WorkloadKind.ADOPTED and s.options == WorkloadOptions()


@pytest.mark.parametrize(
    "options",
    [
        "every 2s",
        {"every": 2, "cron": "* * * * *"},
        {"every": "10000000w"},
        {"every": -1},
        {"cron": "not a cron"},
        {"retention": {}},
        {"retention": {"keep_last": 0}},
        {"restore": {"crash_window": "1000d"}},
        {"criu": {"extra_options": ["--exec-cmd=/bin/sh"]}},
        {"env": {"A=B": "x"}},
        {"env": {"A": "x\0y"}},
        {"env": {"": "x"}},
        {"env": ["A=B"]},
        {"env": {"A": 1}},
        {"every": True},
    ],
)
def test_malformed_options_fall_back_to_the_defaults_with_a_reason(options: Any) -> None:
    w = _workload()
    s = spec.read(_metadata(w, options=options), "web", "X")
    assert not s.carried and s.problem and "checkpoint X of web" in s.problem, s
    # The tree itself is still restorable, with the spec's CRIU options, as before options
    # travelled; nothing of the bad options is used.
    assert s.command == w.command and s.options == WorkloadOptions(criu=w.criu) and s.env == {}


def test_unknown_option_keys_of_a_newer_host_are_ignored() -> None:
    w = _workload()
    meta = _metadata(w)
    meta["spec"]["options"]["priority"] = "high"
    meta["spec"]["colour"] = "blue"
    s = spec.read(meta, "web", "X")
    assert s.carried and s.options.every == 2.0


@pytest.mark.parametrize(
    "bad",
    [
        "managed",
        ["kind", "managed"],
        {"kind": "vm"},
        {"kind": "managed", "command": "rm -rf /"},
        {"kind": "managed", "command": [1, 2]},
        {"kind": "managed", "command": []},
        {"kind": "lxc", "container": "../../etc"},
        {"kind": "podman"},
        {"kind": "managed", "criu": {"extra_options": ["--action-script=/x"]}},
        {"kind": "managed", "cwd": 7},
    ],
)
def test_a_malformed_spec_is_a_clear_restore_error(bad: Any) -> None:
    with pytest.raises(RestoreFailed, match="checkpoint X of web") as e:
        spec.read({"spec": bad}, "web", "X")
    assert "not restored" in str(e.value)


def test_a_bad_log_fifo_path_is_ignored_not_fatal() -> None:
    for path in ("relative/fifo", "/a\nb", 5):
        s = spec.read({"spec": {"kind": "managed", "log_fifo": path}}, "web", "X")
        assert s.log_fifo is None


# -- the engine taking a workload over from its checkpoints (fake CRIU, real repository) -------

Setup = tuple[Engine, FakeCriu, list[tuple[str, str]]]


class RecordingSchedule:
    def __init__(self) -> None:
        self.jobs: dict[str, tuple[float | None, str | None, float | None]] = {}

    def schedule(
        self, name: str, every: float | None, cron: str | None, jitter: float | None = None
    ) -> None:
        self.jobs[name] = (every, cron, jitter)

    def unschedule(self, name: str) -> None:
        self.jobs.pop(name, None)

    def next_run(self, name: str) -> None:
        return None


def _checkpointed_then_gone(engine: Engine) -> Workload:
    """`app` registered with options and checkpointed, then forgotten here (as by a host that
    never knew it): only its checkpoint is left."""
    proc = sleeper()
    FakeCriuProcs.append(proc)
    options = WorkloadOptions.model_validate(
        {"every": "2s", "jitter": "1s", "retention": {"keep_last": 2}, "restore": {"lazy": True}}
    )
    w = services(engine).registering.register("app", pid=proc.pid, options=options)
    w.env = {"CKPT_COLOUR": "teal"}
    engine.checkpoint("app")
    engine.unregister("app", keep_running=True)
    return w


def test_a_host_that_takes_a_workload_over_registers_and_schedules_it_with_its_options(
    setup: Setup,
) -> None:
    engine, _, _ = setup
    engine.schedule = schedule = RecordingSchedule()
    before = _checkpointed_then_gone(engine)
    services(engine).migration.take_over("app", "failover")
    w = engine.get("app")
    assert schedule.jobs["app"] == (2.0, None, 1.0)
    assert w.retention == before.retention and w.restore == before.restore
    assert w.env == {"CKPT_COLOUR": "teal"} and w.state is WorkloadState.RESTORING

    # Registered here before (it ran here, then elsewhere): the newest checkpoint's options win.
    w.state, w.every, w.env = WorkloadState.ELSEWHERE, 60.0, {}
    services(engine).migration.take_over("app", "migration")
    assert (w.every, w.env, schedule.jobs["app"][0]) == (2.0, {"CKPT_COLOUR": "teal"}, 2.0)


def _commit(engine: Engine, tmp: Path, metadata: dict[str, Any]) -> str:
    folder = tmp / "image"
    folder.mkdir(exist_ok=True)
    (folder / "core-1.img").write_bytes(b"core")
    return engine.repo.commit("app", folder, metadata).id


def test_malformed_options_or_tree_in_a_checkpoint_never_raise_from_a_take_over(
    setup: Setup, tmp_path: Path
) -> None:
    engine, _, _ = setup
    engine.schedule = schedule = RecordingSchedule()
    good = {"kind": "managed", "command": ["srv"], "criu": {"file_locks": True}}
    _commit(engine, tmp_path, {"spec": {**good, "options": {"every": "2s", "cron": "@daily"}}})
    services(engine).migration.take_over("app", "failover")
    w = engine.get("app")  # registered as before options travelled, and it says why
    assert w.every is None and w.criu.file_locks and schedule.jobs["app"] == (None, None, None)
    assert w.last_error and "options in checkpoint" in w.last_error, w.last_error

    engine.registry.remove("app")
    _commit(engine, tmp_path, {"spec": {"kind": "managed", "command": "rm -rf /"}})
    services(engine).migration.take_over("app", "failover")  # logged, not registered, no traceback
    assert engine.registry.find("app") is None
