"""CRIU's failure categories: one enum, documented member by member, that the log classifier,
every producer and the restore policy agree on."""

from __future__ import annotations

import ast
import inspect
import json

import pytest

from checkpointer import api
from checkpointer.criu import failure_category
from checkpointer.criu.failures import CriuError, CriuFailure, classify
from checkpointer.engine.policy import Fault, fault_of

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


@pytest.mark.parametrize("category", list(CriuFailure))
def test_a_host_caused_failure_keeps_the_checkpoint_and_any_other_marks_it_bad(
    category: CriuFailure,
) -> None:
    """What each member's docstring says ("Retried") is what the restore policy does."""
    fault = fault_of(CriuError("criu restore of w failed", category))
    assert fault == (Fault.OUTSIDE if category.host_caused else Fault.CHECKPOINT), category


def test_every_category_is_documented() -> None:
    tree = ast.parse(inspect.getsource(failure_category.CriuFailure))
    body = tree.body[0].body  # type: ignore[attr-defined]
    undocumented = [
        stmt.targets[0].id
        for i, stmt in enumerate(body)
        if isinstance(stmt, ast.Assign)
        and not (
            i + 1 < len(body)
            and isinstance(body[i + 1], ast.Expr)
            and isinstance(body[i + 1].value, ast.Constant)
        )
    ]
    assert undocumented == []
    assert len(CriuFailure) > 30


@pytest.mark.parametrize(
    ("line", "category"),
    [
        ("Error (cr-restore.c:1480): Can't fork for 4242: File exists", "pid-in-use"),
        ("Error (files-reg.c:2100): File /srv/a.db has bad size 10 (expect 20)", "file-changed"),
        ("Error (c.c:1): Can't get rlimit 0: Operation not permitted", "needs-cap-sys-resource"),
        ("Error (x.c:1): something nobody foresaw", "unknown"),
    ],
)  # fmt: skip
def test_the_classifier_names_an_enum_member_equal_to_its_old_string(
    line: str, category: str
) -> None:
    """Stored and compared strings (metrics labels, logs, tests, policy sets) stay equal."""
    got = classify(line)[0]
    assert isinstance(got, CriuFailure) and got == category
    assert json.dumps({"category": got}) == json.dumps({"category": category})
    assert f"{got}" == category


def test_the_api_re_exports_the_categories() -> None:
    assert api.CriuFailure is CriuFailure
    assert CriuError("x").category is CriuFailure.UNKNOWN
