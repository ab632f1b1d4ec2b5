"""What the engine reports as it works. The daemon's metrics implement it; the engine does not
know Prometheus (and tests or the benchmark can pass `Silent`)."""

from __future__ import annotations

from typing import Protocol

from checkpointer.criu import DumpStats, RestoreStats


class Events(Protocol):
    def workload_added(self, workload: str) -> None: ...

    def checkpoint_ok(
        self, workload: str, duration: float, stats: DumpStats, image: int, stored: int
    ) -> None: ...

    def checkpoint_failed(self, workload: str, reason: str) -> None: ...

    def restore_done(
        self,
        workload: str,
        reason: str,
        ok: bool,
        duration: float | None = None,
        stats: RestoreStats | None = None,
    ) -> None: ...

    def restore_retried(self, workload: str, reason: str) -> None:
        """A restore failed for a reason outside the checkpoint (storage down, a PID taken)
        and will be tried again: not a failure (`restore_done`), nothing to page about."""
        ...

    def retention_removed(self, workload: str) -> None: ...

    def spool_shed(self, checkpoints: int) -> None: ...

    def gc_collected(self, packs: int) -> None: ...

    def migration_done(self, workload: str, ok: bool, duration: float | None = None) -> None: ...

    def drill_done(self, workload: str, result: str, duration: float) -> None:
        """A restore drill ended: verified, failed (the checkpoint marked bad) or error."""
        ...


class Silent:
    """Events that go nowhere."""

    def workload_added(self, workload: str) -> None:
        pass

    def checkpoint_ok(
        self, workload: str, duration: float, stats: DumpStats, image: int, stored: int
    ) -> None:
        pass

    def checkpoint_failed(self, workload: str, reason: str) -> None:
        pass

    def restore_done(
        self,
        workload: str,
        reason: str,
        ok: bool,
        duration: float | None = None,
        stats: RestoreStats | None = None,
    ) -> None:
        pass

    def restore_retried(self, workload: str, reason: str) -> None:
        pass

    def retention_removed(self, workload: str) -> None:
        pass

    def spool_shed(self, checkpoints: int) -> None:
        pass

    def gc_collected(self, packs: int) -> None:
        pass

    def migration_done(self, workload: str, ok: bool, duration: float | None = None) -> None:
        pass

    def drill_done(self, workload: str, result: str, duration: float) -> None:
        pass
