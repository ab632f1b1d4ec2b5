"""The daemon: wires engine, reaper, scheduler, log pump and API; runs until SIGTERM.

On SIGTERM it stops taking requests and schedules, lets an operation in flight finish (each
holds its workload's lock), and exits. Workloads keep running: they are not its to stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from checkpointer.api import ApiServer
from checkpointer.config import Config, CriuOptions, WorkloadConfig
from checkpointer.criu import Criu
from checkpointer.engine import Engine
from checkpointer.errors import CheckpointerError
from checkpointer.workloads.logs import LogPump
from checkpointer.workloads.reaper import Reaper
from storage import Repository
from storage.backends import LocalBlobStore

log = logging.getLogger(__name__)


def build_engine(config: Config) -> Engine:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(config.state_dir, 0o700)
    criu = Criu(config.criu.binary, config.state_dir / "logs" / "criu-failed", config.criu.timeout)
    criu.require_version()
    repo = Repository(LocalBlobStore(config.repository_path))
    return Engine(config, repo, criu, LogPump())


def _handlers(engine: Engine) -> dict[str, Any]:
    def run(
        name: str,
        command: list[str],
        every: float | None = None,
        cron: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        criu: dict[str, bool] | None = None,
        keep_last: int = 10,
    ) -> Any:
        w = engine.run(
            name,
            command,
            cwd=cwd,
            env=env,
            every=every,
            cron=cron,
            criu=CriuOptions(**(criu or {})),
            keep_last=keep_last,
        )
        return engine.status(w.name)[0]

    def register(
        name: str,
        pid: int | None = None,
        pidfile: str | None = None,
        every: float | None = None,
        cron: str | None = None,
        criu: dict[str, bool] | None = None,
        keep_last: int = 10,
    ) -> Any:
        w = engine.register(
            name,
            pid=pid,
            pidfile=pidfile,
            every=every,
            cron=cron,
            criu=CriuOptions(**(criu or {})),
            keep_last=keep_last,
        )
        return engine.status(w.name)[0]

    return {
        "run": run,
        "register": register,
        "unregister": engine.unregister,
        "status": engine.status,
        "checkpoint": engine.checkpoint,
        "list": engine.list_checkpoints,
        "restore": engine.restore,
        "rollback": engine.rollback,
        "ping": lambda: {"pid": os.getpid()},
    }


def _start_declared(engine: Engine, declared: list[WorkloadConfig]) -> None:
    for wc in declared:
        if wc.name in engine.status_names():
            continue  # registered by a previous daemon: re-adopted by engine.load()
        try:
            if wc.command:
                engine.run(
                    wc.name,
                    wc.command,
                    cwd=str(wc.cwd) if wc.cwd else None,
                    env=wc.env,
                    every=wc.every,
                    cron=wc.cron,
                    criu=wc.criu,
                    keep_last=wc.retention.keep_last,
                )
            else:
                engine.register(
                    wc.name,
                    pid=wc.pid,
                    pidfile=str(wc.pidfile) if wc.pidfile else None,
                    every=wc.every,
                    cron=wc.cron,
                    criu=wc.criu,
                    keep_last=wc.retention.keep_last,
                )
        except CheckpointerError as e:
            log.error("workload %s from the config was not started: %s", wc.name, e)


def run_daemon(config: Config) -> None:
    engine = build_engine(config)
    reaper = Reaper(engine.on_exit)
    reaper.start()
    engine.load()
    server = ApiServer(config.socket_path, _handlers(engine))
    _start_declared(engine, config.workloads)
    engine.scheduler.start()
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
    while not stop.wait(3600):
        pass
    log.info("stopping: workloads keep running")
    engine.stop_all_schedules()
    server.stop()
    engine.wait_idle()
    engine.pump.close()
    reaper.stop()
    engine.save()
    log.info("stopped")
