"""The metadata written with every checkpoint (in its manifest), as one typed record: written
by the checkpoint pipeline (engine/checkpointing.py), read back by `list`, the CPU check and
`hosts`.

Read back as hostile input (anyone with the repository's key writes manifests; in a
repository in clear, anyone who can write the bucket): a field of the wrong type reads as
absent, never as an exception. The workload's own spec (tree and options, `spec`) has its
own parser, with its own rules of refusal (engine/spec.py); the CPU summary too
(criu/cpu/fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from checkpointer.criu.cpu import fit as cpu_fit
from checkpointer.criu.cpu.info import CpuInfo


@dataclass(frozen=True)
class CheckpointSpec:
    host: str | None = None  # the host that took it (its hostname)
    boot_id: str | None = None  # that host's boot, when it took it
    kernel: str | None = None  # that host's kernel release
    criu_version: str | None = None
    pid: int | None = None  # the tree's root PID, as dumped
    dump_stats: dict[str, Any] = field(default_factory=dict)  # CRIU's, as DumpStats.as_dict
    lease_generation: int | None = None  # fleet: the lease it was taken under
    cpu: dict[str, Any] | None = None  # the CPU it was taken on (criu/cpu/fit.py summary)
    spec: dict[str, Any] | None = None  # the workload: tree and options (engine/spec.py)

    def to_metadata(self) -> dict[str, Any]:
        """The JSON the manifest carries (the keys older versions wrote and read)."""
        return {
            "host": self.host,
            "boot_id": self.boot_id,
            "kernel": self.kernel,
            "criu_version": self.criu_version,
            "pid": self.pid,
            "dump_stats": dict(self.dump_stats),
            "lease_generation": self.lease_generation,
            "cpu": self.cpu,
            "spec": self.spec,
        }

    @classmethod
    def read(cls, metadata: object) -> CheckpointSpec:
        """The metadata of a manifest; what is missing or of the wrong type reads as None."""
        m = metadata if isinstance(metadata, dict) else {}
        stats = m.get("dump_stats")
        return cls(
            host=_str(m.get("host")),
            boot_id=_str(m.get("boot_id")),
            kernel=_str(m.get("kernel")),
            criu_version=_str(m.get("criu_version")),
            pid=_int(m.get("pid")),
            dump_stats=dict(stats) if isinstance(stats, dict) else {},
            lease_generation=_int(m.get("lease_generation")),
            cpu=m.get("cpu") if isinstance(m.get("cpu"), dict) else None,
            spec=m.get("spec") if isinstance(m.get("spec"), dict) else None,
        )

    @property
    def frozen_seconds(self) -> float | None:
        """How long the tree was frozen for this checkpoint (CRIU's frozen_time, seconds)."""
        frozen = self.dump_stats.get("frozen_time")
        return frozen if isinstance(frozen, int | float) and not isinstance(frozen, bool) else None

    def cpu_info(self) -> CpuInfo | None:
        """The CPU it was taken on, if the summary is exactly one (cpu_fit.parse)."""
        return cpu_fit.parse(self.cpu)


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None
