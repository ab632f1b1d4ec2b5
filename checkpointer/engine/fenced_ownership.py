"""The fleet's ownership with the repository's heads kept in step (docs/fleet.md, R4).

Winning a workload's lease is not enough to fence a former owner that does not know it lost
it: its commits must fail in the store. So claiming a lease bumps the workload's head to the
lease's generation at once, before anything is restored or started, and the checkpoints a
restore chooses from are read after that. A head already at a newer generation means another
host took the workload meanwhile: that is NotOwner, like a lease held elsewhere.
"""

from __future__ import annotations

from checkpointer.engine.ownership import Ownership
from checkpointer.errors import NotOwner
from storage import Repository
from storage.heads import Fenced


class FencedOwnership:
    def __init__(self, inner: Ownership, repo: Repository) -> None:
        self.inner = inner
        self.repo = repo

    def hold(self, name: str) -> int | None:
        return self.inner.hold(name)

    def claim(self, name: str) -> int | None:
        generation = self.inner.claim(name)
        try:
            self.repo.fence(name, generation)
        except Fenced as e:
            raise NotOwner(str(e)) from e
        return generation

    def release(self, name: str) -> None:
        self.inner.release(name)
        self.repo.disown(name)  # grace times, retention, pins: stale once another owns it

    def owner(self, name: str) -> str | None:
        return self.inner.owner(name)
