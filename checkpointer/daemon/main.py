"""The daemon: wires engine, reaper, scheduler, log pump and API; runs until SIGTERM.

On SIGTERM it stops taking requests and schedules, lets an operation in flight finish (each
holds its workload's lock), and exits. Workloads keep running: they are not its to stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from checkpointer import __version__
from checkpointer.api import Op
from checkpointer.config import Config, WorkloadConfig, WorkloadOptions, format_validation_error
from checkpointer.criu import Criu, kdat_cache
from checkpointer.daemon.api_server import ApiServer, Handler, claim_socket_path
from checkpointer.daemon.drill_metrics import DrillCollector
from checkpointer.daemon.fleet import Fleet, FleetHooks
from checkpointer.daemon.metrics import EngineCollector, Metrics
from checkpointer.daemon.scheduler import CheckpointScheduler
from checkpointer.daemon.supervisor import Supervisor
from checkpointer.engine import (
    Engine,
    Hooks,
    WorkloadKind,
    WorkloadState,
    drain,
    drills,
    host_cpus,
    scratch_sweep,
    shutdown,
)
from checkpointer.engine.carried import FromCheckpoint
from checkpointer.engine.cpu_check import CpuCheck
from checkpointer.engine.migration import Migration
from checkpointer.engine.ownership import LocalCopies, SingleHost
from checkpointer.engine.recovery import Recovery
from checkpointer.engine.registering import Registering
from checkpointer.engine.reports import Reports
from checkpointer.engine.workload import Workload
from checkpointer.errors import CheckpointerError, ConfigError, FleetUnavailable, MigrationFailed
from checkpointer.host import info as hostinfo
from checkpointer.host.malloc import keep_heap_small
from checkpointer.repository.stack import open_repository
from checkpointer.workloads.deadman import Deadman
from checkpointer.workloads.logs import LogPump
from storage.host_records import HostRecords

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """The operations on the engine's workloads, each given only the parts it uses."""

    recovery: Recovery
    migration: Migration
    registering: Registering
    reports: Reports


def services(engine: Engine) -> Services:
    """Build the services over `engine`'s parts (the daemon's `build`, and tests)."""
    e = engine
    fleet = e.fleet
    cpu = CpuCheck(
        e.repo,
        e.criu,
        e.ownership,
        e.events,
        host=lambda: fleet.host if fleet is not None else hostinfo.host_facts()["host"],
    )
    carried = FromCheckpoint(e, e.repo)
    return Services(
        recovery=Recovery(
            e, e.repo, e.restores, e.ownership, e.events, e.hooks, e.spool, cpu, carried
        ),
        migration=Migration(
            e,
            e.repo,
            e.checkpoints,
            e.restores,
            e.scratch,
            e.ownership,
            e.events,
            e.hooks,
            e.spool,
            fleet,
            e.runtimes,
            cpu,
            carried,
        ),
        registering=Registering(e, e.ownership, e.runtimes, e.hooks),
        reports=Reports(e, e.repo, e.schedule, e.logs, e.ownership, e.drills, fleet),
    )


def build(
    config: Config,
) -> tuple[Engine, Services, Supervisor, CheckpointScheduler, Metrics, Fleet | None]:
    """Construct and wire the daemon's parts; each gets what it uses when it is made."""
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(config.state_dir, 0o700)
    criu = Criu(config.criu.binary, config.state_dir / "logs" / "criu-failed", config.criu.timeout)
    metrics = Metrics()
    metrics.build_info.labels(__version__, criu.require_version()).set(1)
    log.info("%s", kdat_cache.ensure(criu.exe()))
    repo, spool = open_repository(config, metrics)
    fleet = None
    if config.fleet.enabled:
        if spool is None:
            raise FleetUnavailable(
                "fleet mode needs S3 storage (storage.backend: s3): the hosts share a bucket"
            )
        fleet = Fleet(config, spool.remote, repo.codec)  # leases never go through the spool
        fleet.check_store()
    # The scheduler and the hooks call into parts made after them: late-bound closures.
    scheduler = CheckpointScheduler(
        lambda name: engine.scheduled_checkpoint(name),
        on_skip=lambda reason: metrics.schedule_skipped.labels(reason).inc(),
    )

    def watch(w: Workload) -> None:
        supervisor.track(w)
        if fleet is not None:
            fleet.tree_started(w.name)  # the deadman learns the new PID at once

    hooks = Hooks(
        watch=watch,
        down=lambda w, reason: supervisor.decide(w, reason),
        restore_soon=lambda w, reason: supervisor.restore_soon(w, reason),
    )
    engine = Engine(
        config,
        repo,
        criu,
        LogPump(),
        metrics,
        scheduler,
        hooks,
        spool,
        fleet or SingleHost(),
        fleet,
    )
    parts = services(engine)
    supervisor = Supervisor(engine, parts.recovery)
    metrics.registry.register(EngineCollector(engine, spool, config.storage.spool_max_bytes, fleet))
    metrics.registry.register(DrillCollector(engine, fleet))
    return engine, parts, supervisor, scheduler, metrics, fleet


def _handlers(
    engine: Engine, parts: Services, scheduler: CheckpointScheduler, fleet: Fleet | None
) -> dict[str, Handler]:
    """Each op's handler; its keyword arguments are the op's request (api.REQUESTS), which
    the API server checks every handler against when it is built."""
    registering, reports = parts.registering, parts.reports

    def run(
        name: str,
        command: list[str],
        options: dict[str, Any],
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        w = registering.run(name, command, _options(options), cwd=cwd, env=env)
        return reports.status(w.name)[0]

    def register(
        name: str,
        options: dict[str, Any],
        pid: int | None = None,
        pidfile: str | None = None,
        lxc: str | None = None,
        podman: str | None = None,
    ) -> Any:
        if lxc is not None or podman is not None:
            kind = WorkloadKind.LXC if lxc is not None else WorkloadKind.PODMAN
            container = lxc if lxc is not None else podman
            assert container is not None
            w = registering.register_container(name, kind, container, _options(options))
        else:
            w = registering.register(name, pid=pid, pidfile=pidfile, options=_options(options))
        return reports.status(w.name)[0]

    def shutdown_checkpoint(budget: float | None = None) -> Any:
        # No scheduled checkpoint after a final one: it would thaw nothing, but it would be
        # the newest checkpoint and could be cut short by the power going.
        scheduler.shutdown()
        return shutdown.take_final_checkpoints(
            engine, engine.config.shutdown.budget if budget is None else budget
        )

    def hosts() -> Any:
        if fleet is None:
            return reports.hosts()
        rows = drain.hosts(reports, fleet)
        host_cpus.judge(engine, HostRecords(fleet.store, engine.repo.codec), rows)
        return rows

    def drain_host(to: str | None = None, progress: drain.Progress | None = None) -> Any:
        if fleet is None:
            raise MigrationFailed(
                "drain needs fleet mode: set fleet.enabled (with S3 storage) on every host"
            )
        return drain.drain(engine, parts.migration.migrate, fleet, to, progress)

    handlers: dict[Op, Handler] = {
        Op.RUN: run,
        Op.REGISTER: register,
        Op.UNREGISTER: engine.unregister,
        Op.STATUS: reports.status,
        Op.CHECKPOINT: engine.checkpoint,
        Op.LIST: reports.list_checkpoints,
        Op.RESTORE: parts.recovery.restore,
        Op.ROLLBACK: parts.recovery.rollback,
        Op.PRUNE: engine.prune,
        Op.VERIFY: reports.verify,
        Op.PIN: engine.pin,
        Op.PING: lambda: {"pid": os.getpid()},
        Op.MIGRATE: parts.migration.migrate,
        Op.HOSTS: hosts,
        Op.SHUTDOWN_CHECKPOINT: shutdown_checkpoint,
        Op.DRAIN: drain_host,
        Op.DRILL: engine.drills.drill,
    }
    return {str(op): fn for op, fn in handlers.items()}


def _options(raw: dict[str, Any]) -> WorkloadOptions:
    try:
        return WorkloadOptions.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid workload options: {format_validation_error(e, raw)}") from e


def _start_declared(
    engine: Engine, registering: Registering, supervisor: Supervisor, declared: list[WorkloadConfig]
) -> None:
    """Start or adopt the config's workloads. One registered before gets the config's options
    and, if it was stopped with the daemon, comes back from its latest checkpoint."""
    for wc in declared:
        try:
            if engine.registry.find(wc.name) is not None:
                engine.update_options(wc.name, wc.options())
                w = engine.get(wc.name)
                if (
                    w.state is WorkloadState.STOPPED and not w.alive()
                ):  # not "exited": that one finished
                    supervisor.bring_back(w, "declared in the config, stopped with the daemon")
            elif wc.command:
                registering.run(
                    wc.name,
                    wc.command,
                    wc.options(),
                    cwd=str(wc.cwd) if wc.cwd else None,
                    env=wc.env,
                )
            elif wc.lxc or wc.podman:
                kind = WorkloadKind.LXC if wc.lxc else WorkloadKind.PODMAN
                container = wc.lxc or wc.podman
                assert container is not None
                registering.register_container(wc.name, kind, container, wc.options())
            else:
                registering.register(
                    wc.name,
                    pid=wc.pid,
                    pidfile=str(wc.pidfile) if wc.pidfile else None,
                    options=wc.options(),
                )
        except CheckpointerError as e:
            log.error("workload %s from the config was not started: %s", wc.name, e)


def run_daemon(config: Config, stop_workloads_on_exit: bool = False) -> None:
    keep_heap_small()  # before the first checkpoint allocates its buffers
    engine, parts, supervisor, scheduler, metrics, fleet = build(config)
    # Before anything runs, a live daemon on this state folder first: its metrics port is
    # taken too, and "set metrics.port" would send the operator the wrong way.
    claim_socket_path(config.socket_path)
    if config.metrics.enabled:  # before anything runs: a port in use stops the start cleanly
        metrics.serve(config.metrics.address, config.metrics.port)
        log.info("metrics on http://%s:%d/metrics", config.metrics.address, config.metrics.port)
    scratch_sweep.sweep(engine.scratch)  # what a killed daemon left; before we make our own
    deadman = None
    if fleet is not None:  # first: a previous daemon's deadman must not stop what we restore
        deadman = Deadman(config.state_dir)
        deadman.start()
    supervisor.start()
    engine.load()
    server = ApiServer(config.socket_path, _handlers(engine, parts, scheduler, fleet))
    shutdown.settle_at_start(engine)  # trees a shutdown left stopped, if it never came
    supervisor.recover_at_start()
    if fleet is not None:
        assert deadman is not None
        copies = LocalCopies(engine.registry.find, deadman)
        fleet.start(
            FleetHooks(
                lost=parts.migration.fence,
                offered=parts.migration.take_over,
                known=lambda: [w.name for w in engine.workloads() if w.alive()],
                prefetch=parts.migration.prefetch,
                newest=engine.newest_checkpoint,
                freeze=copies.freeze,
                thaw=copies.thaw,
                guard=copies.guard,
                unguard=copies.unguard,
            )
        )
        host_cpus.publish(engine, HostRecords(fleet.store, engine.repo.codec), fleet.host)
    _start_declared(engine, parts.registering, supervisor, config.workloads)
    if config.storage.gc_every:
        scheduler.every(config.storage.gc_every, "gc", engine.maintenance.scheduled_gc)
    engine.drills.sweep()  # before any drill can run
    scheduler.every(drills.TICK, "drills", engine.drills.run_due)  # drill.every
    scheduler.start()
    server.start()
    log.info(
        "checkpointer daemon %d ready: socket %s, repository %s",
        os.getpid(),
        config.socket_path,
        engine.repo.backend.describe(),
    )

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Short waits: the kernel may deliver SIGTERM to another thread, and then nothing wakes a
    # main thread blocked in a long wait (seen: a stop that hung until a second SIGTERM).
    while not stop.wait(1.0):
        pass
    scheduler.shutdown()
    if stop_workloads_on_exit:
        # Before the supervisor stops: its reaper collects them (they are our children).
        log.info("stopping, with the managed workloads (--stop-workloads-on-exit)")
        engine.stop_managed()
    else:
        log.info("stopping: workloads keep running")
    if fleet is not None:
        fleet.stop()
    if deadman is not None:
        deadman.close()  # it keeps the deadlines it has: the leases are renewed no more
    supervisor.stop()
    server.stop()
    engine.wait_idle()
    engine.pump.close()
    if engine.spool is not None:
        engine.spool.close()
    engine.save()
    log.info("stopped")
