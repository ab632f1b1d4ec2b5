"""Each op's request (checkpointer/api.py's REQUESTS) against the daemon's real handler table:
every field the CLI sends reaches a parameter, every parameter without a default is a
required field. The check the API server runs when the daemon starts, run here without one."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import pytest

from checkpointer.api import REQUESTS, Op
from checkpointer.daemon import main
from checkpointer.daemon.api_server import Route
from checkpointer.engine.drills import Drills
from checkpointer.engine.facade import Engine
from checkpointer.engine.migration import Migration
from checkpointer.engine.recovery import Recovery
from checkpointer.engine.reports import Reports

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def unbound(cls: type, *names: str) -> SimpleNamespace:
    """The class's methods with `self` taken: their signatures as the daemon's bound ones."""
    return SimpleNamespace(**{n: partial(getattr(cls, n), None) for n in names})


def test_the_daemons_handlers_take_exactly_their_requests() -> None:
    engine = unbound(Engine, "unregister", "checkpoint", "prune", "pin")
    engine.drills = unbound(Drills, "drill")
    parts = SimpleNamespace(
        recovery=unbound(Recovery, "restore", "rollback"),
        migration=unbound(Migration, "migrate"),
        registering=None,
        reports=unbound(Reports, "status", "list_checkpoints", "verify"),
    )
    handlers = main._handlers(cast(Any, engine), cast(Any, parts), cast(Any, None), None)
    assert set(handlers) == {str(op) for op in Op} == {str(op) for op in REQUESTS}
    for op, handler in handlers.items():
        Route.of(op, handler, REQUESTS[Op(op)])  # raises TypeError naming the op


def test_a_handler_that_drifted_from_its_request_is_refused_at_start() -> None:
    def status(who: str) -> object:  # the request's field is `name`
        return who

    with pytest.raises(TypeError, match="op 'status'"):
        Route.of("status", status, REQUESTS[Op.STATUS])
