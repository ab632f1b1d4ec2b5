"""Which hosts of the fleet can take which workloads, by CPU, for `checkpointer hosts`.

A host publishes its CPU at daemon start (storage/host_records.py: `hostinfo/<host>`), each
checkpoint carries the CPU it was taken on in its metadata (`cpu`, written by
checkpointer/engine/checkpointing.py), and `judge` compares the newest checkpoint of every
workload the fleet runs with every live host's CPU by CRIU's own rules
(checkpointer/criu/cpu/fit.py): no image is downloaded and no CRIU runs, so the answer costs
one record per host and one manifest per workload. It is advice for the operator: migrate
and failover still run `criu cpuinfo check` on the checkpoint they restore.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from checkpointer.api import HostReport
from checkpointer.criu import CriuError
from checkpointer.criu.cpu import fit as cpu_fit
from checkpointer.criu.cpu.info import CpuInfo, here
from checkpointer.engine.checkpoint_spec import CheckpointSpec
from checkpointer.engine.facade import Engine
from storage import StorageError
from storage.host_records import HostRecords

log = logging.getLogger(__name__)
_READERS = 8


def publish(engine: Engine, records: HostRecords, host: str) -> None:
    """Store this host's CPU as its record, if the stored one says otherwise. A failure costs
    `hosts` its judgement of this host (shown as unknown), nothing else."""
    try:
        if records.publish(host, {"cpu": cpu_fit.summary(here(engine.criu))}):
            log.info("published this host's CPU for `checkpointer hosts` (hostinfo/%s)", host)
    except (CriuError, OSError, ValueError, StorageError) as e:
        log.warning("cannot publish this host's CPU (`hosts` shows it as unknown): %s", e)


def judge(engine: Engine, records: HostRecords, rows: list[HostReport]) -> None:
    """Set each row's `cpu_known` and `cannot_take`: the workloads whose newest checkpoint
    its CPU cannot run, each with the features it lacks."""
    published = records.read(r["host"] for r in rows)
    needs = _newest_cpus(engine, sorted({n for r in rows for n in r["workloads"]}))
    for row in rows:
        cpu = cpu_fit.parse(published.get(row["host"], {}).get("cpu"))
        row["cpu_known"] = cpu is not None
        row["cannot_take"] = []
        if cpu is None:
            continue
        for name, (checkpoint, image) in needs.items():
            lacks = cpu_fit.missing(image, cpu)
            if lacks:
                row["cannot_take"].append(
                    {"workload": name, "checkpoint": checkpoint, "missing": list(lacks)}
                )


def _newest_cpus(engine: Engine, names: list[str]) -> dict[str, tuple[str, CpuInfo]]:
    """Workload -> (its newest checkpoint, the CPU it records), where one is recorded. A
    few reads at a time: a fleet of hundreds of workloads costs a head and a manifest each
    (manifests are cached by key: a second `hosts` reads the heads only)."""
    with ThreadPoolExecutor(_READERS, thread_name_prefix="hosts-cpu") as pool:
        found = pool.map(lambda n: _newest_cpu(engine, n), names)
        return {name: cpu for name, cpu in zip(names, found, strict=True) if cpu is not None}


def _newest_cpu(engine: Engine, name: str) -> tuple[str, CpuInfo] | None:
    try:
        infos = engine.repo.checkpoints(name)
    except (StorageError, ValueError) as e:
        log.warning("hosts: cannot read the checkpoints of %s: %s", name, e)
        return None
    cpu = CheckpointSpec.read(infos[0].metadata).cpu_info() if infos else None
    return (infos[0].id, cpu) if cpu is not None else None
