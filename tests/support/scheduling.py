"""How `make test` spreads the suite over its pytest-xdist workers: test by test, except that a
file whose tests share a fixture (scope module, class or package), or must run in their
order, goes whole to one worker, so the fixture is built once rather than on every worker its
tests land on (test_install.py's `make install` takes a minute or two).

xdist's own `--dist loadgroup` cannot be told this: it passes a test's group to the
scheduler by appending it to the test's node id on the worker, which pytest 9.2 ignores
(node ids are structured there; pytest-xdist issue 1386), so every group silently falls
apart. The controller decides here instead, from the node ids and the files themselves.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadGroupScheduling

# Files whose tests must run on one worker, in file order, though they share no fixture.
IN_ORDER = {"test_install.py"}  # install, then upgrade and package, `make uninstall` last
_SHARED_FIXTURE = re.compile(r"""@pytest\.fixture\([^)]*scope=["'](module|class|package)["']""")


@functools.cache
def shares_fixtures(path: Path) -> bool:
    """Whether the test file at PATH runs whole on one worker."""
    try:
        return path.name in IN_ORDER or bool(_SHARED_FIXTURE.search(path.read_text()))
    except OSError:
        return False


class FilesThatShare(LoadGroupScheduling):
    """xdist's scheduler, with each file that shares_fixtures() as one unit of work. Units
    holding more tests are handed out first (xdist's default order), so those files start
    early and the run does not end waiting on one."""

    def __init__(self, config: pytest.Config, log: Producer | None, root: Path) -> None:
        super().__init__(config, log)
        self.root = root

    def _split_scope(self, nodeid: str) -> str:
        scope = super()._split_scope(nodeid)  # an xdist_group, once xdist passes them again
        if scope != nodeid:
            return scope
        file = nodeid.split("::", 1)[0]
        return file if shares_fixtures(self.root / file) else nodeid
