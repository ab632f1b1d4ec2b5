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


def test_a_nul_byte_anywhere_in_a_request_is_refused_naming_its_field() -> None:
    """Was: a `cwd`, `pidfile`, argument or environment string with a NUL byte passed the
    check and failed deep in an OS call ("embedded null byte": an internal error)."""

    def run(name: str, command: list[str], options: dict[str, Any], cwd: Any = None,
            env: Any = None) -> None: ...  # fmt: skip

    route = Route.of("run", run, REQUESTS[Op.RUN])
    good = {"name": "w", "command": ["x"], "options": {}, "cwd": "/srv", "env": {"A": "b"}}
    assert route.check(good) == good
    for bad, field in (
        ({"cwd": "/srv\0x"}, "cwd"),
        ({"command": ["x", "a\0"]}, "command.1"),
        ({"env": {"A": "b\0"}}, "env.A"),
        ({"env": {"A\0": "b"}}, "env (a key)"),
        ({"options": {"criu": {"extra_options": ["--x\0"]}}}, "options.criu.extra_options.0"),
    ):
        assert route.check({**good, **bad}) == f"field `{field}`: a NUL byte in a string"
