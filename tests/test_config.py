"""Config validation: errors name the key and its path; relative paths follow the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpointer.config import load_config
from checkpointer.config.durations import parse_duration
from checkpointer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp: Path, text: str) -> Path:
    p = tmp / "c.yaml"
    p.write_text(text)
    return p


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return str(e.value)


def test_unknown_key_names_its_path_and_the_valid_keys(workdir: Path) -> None:
    p = write(workdir, "workloads:\n  - name: web\n    command: [x]\n    evry: 5s\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "workloads[0](web).evry: unknown key" in msg and "every" in msg and str(p) in msg


def test_bad_duration_and_conflicting_sources(workdir: Path) -> None:
    p = write(
        workdir,
        "workloads:\n  - name: a\n    command: [x]\n    pid: 3\n"
        "  - name: b\n    command: [x]\n    every: soon\n",
    )
    msg = config_error(p)
    assert "workloads[0](a): give exactly one of command" in msg
    assert "workloads[1](b).every: 'soon' is not a duration" in msg


def test_top_level_typo_and_bad_yaml(workdir: Path) -> None:
    msg = config_error(write(workdir, "stat_dir: /x\n"))
    assert "stat_dir: unknown key" in msg and "state_dir" in msg
    msg = config_error(write(workdir, "a: [\n"))
    assert "not valid YAML" in msg


def test_duplicate_and_invalid_names(workdir: Path) -> None:
    p = write(workdir, "workloads:\n  - {name: a, pid: 1}\n  - {name: a, pid: 2}\n")
    assert "declared twice" in config_error(p)
    p = write(workdir, "workloads:\n  - {name: ../x, pid: 1}\n")
    assert "invalid workload name" in config_error(p)


def test_relative_paths_are_relative_to_the_config_file(workdir: Path) -> None:
    (workdir / "sub").mkdir()
    p = workdir / "sub" / "c.yaml"
    p.write_text("state_dir: ../state\nworkloads:\n  - {name: a, command: [x], every: 1m30s}\n")
    c = load_config(p)
    assert c.state_dir == workdir / "state"
    assert c.repository_path == workdir / "state" / "repository"
    assert c.workloads[0].cwd == workdir / "sub" and c.workloads[0].every == 90


def test_shipped_configs_are_valid() -> None:
    for name in ("checkpointer.yaml", "demo.yaml", "s3.yaml"):
        load_config(ROOT / "configs" / name)


def test_missing_file() -> None:
    assert "does not exist" in str(config_error(Path("/nonexistent.yaml")))


@pytest.mark.parametrize(
    "text,seconds", [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("2", 2), (7, 7)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1s", "0", "1s2"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_systemd_unit_keeps_workloads_when_the_daemon_stops() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "configs" / "checkpointer.service")
    service = unit["Service"]
    assert service["KillMode"] == "process"  # never kill the workloads with the daemon
    assert service["Restart"] == "on-failure"
    assert " daemon --config " in service["ExecStart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
