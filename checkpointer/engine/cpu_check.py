"""Whether this host's CPU can run a workload's checkpoint, asked before anyone stops or
gives up a tree: the target of a migration checks what it fetched ahead, a host taking over
after a failover checks before it claims the lease (so a compatible host takes it instead),
and a restore by hand of another host's checkpoint is refused in one line rather than CRIU
failing late or the tree dying of SIGILL. Used by Recovery and Migration alike.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from checkpointer.criu import CpuMismatch, Criu, cpuinfo_check
from checkpointer.criu.cpu.info import CPUINFO_IMAGE
from checkpointer.engine.checkpoint_spec import CheckpointSpec
from checkpointer.errors import CheckpointerError
from storage import Repository, StorageError
from storage.file_reader import CheckpointFiles

if TYPE_CHECKING:
    from checkpointer.engine.events import Events
    from checkpointer.engine.ownership import Ownership
    from storage.repository import CheckpointInfo

log = logging.getLogger(__name__)

_CPUINFO_MAX = 64 * 1024  # CRIU writes ~150 bytes; a bigger one is not read whole


@runtime_checkable
class CpuRefusals(Protocol):
    """Events that count checkpoints this host's CPU cannot run (the daemon's metrics)."""

    def cpu_refused(self, workload: str) -> None: ...


class CpuCheck:
    def __init__(
        self,
        repo: Repository,
        criu: Criu,
        ownership: Ownership,
        events: Events,
        host: Callable[[], str],
    ) -> None:
        self.repo = repo
        self.criu = criu
        self.ownership = ownership
        self.events = events
        self.host = host  # this host's name, for the message
        # Workload -> the newest checkpoint this host's CPU was found unable to run: the
        # fleet offers an expired lease at every scan, and fetching the same checkpoint
        # again says nothing new.
        self._refused: dict[str, str] = {}

    def check(self, name: str, info: CheckpointInfo, images: Path) -> None:
        """Refuse (CpuMismatch, one line: the features, both hosts) the checkpoint whose
        image is in `images` if this host's CPU cannot run it."""
        check = cpuinfo_check(self.criu, images)
        if check is None or check.compatible:
            return
        taken_on = CheckpointSpec.read(info.metadata).host
        there = self.ownership.owner(name) or taken_on or "(unknown)"
        raise CpuMismatch(
            f"{name} cannot run on host {self.host()}: its CPU {check.summary()}, which host "
            f"{there} has (checkpoint {info.id}; criu cpuinfo check: {check.criu_says})"
        )

    def check_stored(self, name: str, checkpoint_id: str | None = None) -> None:
        """`check` of the newest checkpoint (or `checkpoint_id`), reading only its
        `cpuinfo.img` (authenticated like every file, with the packs' indexes): a failover or
        a restore by hand fetches the rest once it knows this host can run it."""
        infos = self.repo.checkpoints(name)
        info = next((c for c in infos if c.id == checkpoint_id), infos[0] if infos else None)
        if info is None:
            return
        files = CheckpointFiles(self.repo, name, info.id, self.repo.known_chunks(name))
        if CPUINFO_IMAGE not in files.files or files.size(CPUINFO_IMAGE) > _CPUINFO_MAX:
            return  # taken by an older version: nothing to check against
        with tempfile.TemporaryDirectory(prefix="cpuinfo-") as tmp:
            recorded = files.read(CPUINFO_IMAGE, 0, files.size(CPUINFO_IMAGE))
            (Path(tmp) / CPUINFO_IMAGE).write_bytes(recorded)
            self.check(name, info, Path(tmp))

    def fits(self, name: str) -> bool:
        """Before a failover claims the lease: check the newest checkpoint's CPU here. A
        mismatch is logged in one line and counted (alert CheckpointerWorkloadCpuIncompatible
        when no host of the fleet can take it)."""
        try:
            infos = self.repo.checkpoints(name)
            if infos and self._refused.get(name) == infos[0].id:
                return False
            self.check_stored(name)
        except CpuMismatch as e:
            self._refused[name] = infos[0].id
            log.error("failover: %s; leaving it to another host", e)
            if isinstance(self.events, CpuRefusals):
                self.events.cpu_refused(name)
            return False
        except (CheckpointerError, StorageError, OSError) as e:  # the restore says it better
            log.warning("failover: cannot fetch %s ahead to check its CPU: %s", name, e)
        self._refused.pop(name, None)
        return True

    def before_restore(self, name: str, checkpoint_id: str | None, release: bool) -> None:
        """A restore of another host's checkpoint: CpuMismatch if this CPU lacks features it
        uses; a check that cannot be made is left to the restore, which says it better.
        `release`: the lease was claimed for it, and goes back on a mismatch."""
        try:
            self.check_stored(name, checkpoint_id)
        except CpuMismatch:
            if release:
                self.ownership.release(name)
            raise
        except (CheckpointerError, StorageError, OSError) as e:
            log.warning("cannot read the CPU %s's checkpoint was taken on: %s", name, e)
