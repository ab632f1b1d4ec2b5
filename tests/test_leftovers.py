"""The guard every test runs under (tests/support/leftovers.py): what a test leaves is named
and cleaned up, what it cleaned up itself is not, whatever the program."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import leftovers

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_a_child_left_running_is_named_and_killed(tmp_path: Path) -> None:
    before = leftovers.snapshot([tmp_path], tmp_path)
    left_running = subprocess.Popen(["sleep", "60"], start_new_session=True)
    finished = subprocess.Popen(["true"])
    finished.wait()
    found = leftovers.left_behind(before, tmp_path, token="t1", grace=0.3)
    assert found == [f"process {left_running.pid} (sleep 60)"]
    assert left_running.wait(timeout=10) == -9


def test_an_orphan_elsewhere_is_found_by_the_tests_token(tmp_path: Path) -> None:
    """Not a descendant any more, not in the test's folders: its environment gives it away."""
    before = leftovers.snapshot([tmp_path], tmp_path)
    env = {**os.environ, leftovers.TOKEN_VAR: "t2"}
    out = subprocess.run(
        ["sh", "-c", "setsid sleep 61 >/dev/null 2>&1 & echo $!"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = int(out.stdout)
    try:
        assert leftovers.left_behind(before, tmp_path, token="other", grace=0.3) == []
        found = leftovers.left_behind(before, tmp_path, token="t2", grace=0.3)
        assert found == [f"process {orphan} (sleep 61)"]
        deadline = time.monotonic() + 10
        while not gone(orphan):
            assert time.monotonic() < deadline, "the orphan was not killed"
            time.sleep(0.05)
    finally:
        if not gone(orphan):
            os.kill(orphan, 9)


def test_a_temporary_folder_left_is_named_and_one_removed_is_not(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    before = leftovers.snapshot([tmp_path], tmp_path)
    (tmp_path / "kept").mkdir()
    (tmp_path / "removed").mkdir()
    (tmp_path / "removed").rmdir()
    found = leftovers.left_behind(before, tmp_path, token="t3", grace=0)
    assert found == [f"temporary folder {tmp_path / 'kept'}"]
