"""A second daemon started on the state folder of a running one says so in one line and
stops before it does anything: its metrics port is taken too, but that is not the news."""

from __future__ import annotations

from pathlib import Path

from tests.support import Daemon
from tests.support.daemon import refused_start


def test_a_second_daemon_beside_a_running_one_is_told_another_daemon_serves(
    workdir: Path,
) -> None:
    """Was (since the metrics port was taken first): "metrics: cannot listen on ...: set
    `metrics.port` to a free port", which sent the operator to change the port of a daemon
    that must not start at all."""
    d = Daemon(workdir)
    try:
        d.start()
        err = refused_start(d.config)
        assert "another checkpointer daemon is already serving" in err, err
        assert "metrics.port" not in err, err
        assert d.json("status") == []  # the first one still answers
    finally:
        d.stop()


def test_a_socket_path_that_is_a_file_or_a_folder_is_refused_and_left_alone(
    tmp_path: Path,
) -> None:
    """Was: a regular file at `socket:` was deleted as a stale socket (an operator's typo
    cost them the file), and a folder there ended in "internal error (IsADirectoryError)"."""
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for path in (precious, folder):
        conf = tmp_path / "config.yaml"
        conf.write_text(
            f"state_dir: {tmp_path / 'state'}\nsocket: {path}\nmetrics:\n  enabled: false\n"
        )
        err = refused_start(conf)
        assert f"{path} exists and is not a socket" in err, err
    assert precious.read_text() == "keep me\n" and folder.is_dir()
