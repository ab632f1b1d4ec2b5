"""Config validation: errors name the key and its path; relative paths follow the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpointer.config import load_config
from checkpointer.config.durations import parse_bytes, parse_duration
from checkpointer.errors import ConfigError

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

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


# Values that validated but broke the daemon later: each is a config error naming its key.
ONE = "workloads:\n  - name: a\n    command: [x]\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        # select.poll takes a C int of milliseconds: every CRIU run raised OverflowError
        ("criu:\n  timeout: 30d\n", "criu.timeout: '30d': a duration here must be at most 1d"),
        # registered, then APScheduler overflowed datetime at every start of the daemon
        (ONE + "    every: 1000000w\n", "workloads[0](a).every: '1000000w': a duration here"),
        (ONE + "    jitter: 400d\n", "workloads[0](a).jitter: '400d': a duration here"),
        ("storage:\n  gc_every: 1000w\n", "storage.gc_every: '1000w': a duration here must be"),
        (ONE + "    restore: {backoff_max: 400d}\n", "workloads[0](a).restore: backoff_max: a"),
        (ONE + "    restore: {crash_window: 1000000w}\n", "restore.crash_window: '1000000w'"),
        # "error: embedded null byte" at the daemon's start, no key named
        ('storage:\n  path: "/tmp/a\\0b"\n', "storage.path: a file name cannot hold a NUL byte"),
        ('storage:\n  key_file: "/k\\0"\n', "storage.key_file: a file name cannot hold a NUL"),
        (ONE + '    cwd: "/srv\\0"\n', "workloads[0](a).cwd: a file name cannot hold a NUL"),
        # not finite
        ("storage:\n  gc_grace: .nan\n", "storage.gc_grace: nan: a duration must be a finite"),
        ("storage:\n  gc_grace: .inf\n", "storage.gc_grace: inf: a duration must be a finite"),
        ("storage:\n  gc_grace: -.inf\n", "storage.gc_grace: -inf: a duration must be a finite"),
        ("storage:\n  gc_grace: " + "9" * 400 + "s\n", "storage.gc_grace: '999"),
        ("storage:\n  gc_grace: " + "9" * 400 + "\n", "a duration must be a finite number"),
        ("storage:\n  spool_max_bytes: " + "9" * 400 + "\n", "a size must be at most"),
        ("storage:\n  spool_max_bytes: .inf\n", "storage.spool_max_bytes: inf: a size must be"),
        ("storage:\n  spool_max_bytes: .nan\n", "storage.spool_max_bytes: nan: a size must be"),
        ("storage:\n  spool_max_bytes: " + "9" * 400 + "GiB\n", "a size must be a finite"),
        (
            "storage:\n  spool_max_bytes: 1.0e+30\n",
            "storage.spool_max_bytes: 1e+30: a size must be",
        ),
        ("storage:\n  spool_max_bytes: -5\n", "storage.spool_max_bytes: -5: a size must be"),
        # wrong types were AttributeError/TypeError in the parsers: "internal error"
        (ONE + "    every: [1]\n", "workloads[0](a).every: [1] is not a duration"),
        (ONE + "    every: {a: 1}\n", "workloads[0](a).every: {'a': 1} is not a duration"),
        (ONE + "    every: true\n", "workloads[0](a).every: True is not a duration"),
        ("storage:\n  spool_max_bytes: [1]\n", "storage.spool_max_bytes: [1] is not a size"),
        ("storage:\n  spool_max_bytes: {a: 1}\n", "storage.spool_max_bytes: {'a': 1} is not"),
        ("storage:\n  s3: {bucket: b, read_timeout: [1]}\n", "storage.s3.read_timeout: [1] is"),
        # cron: checked as the scheduler reads it
        (ONE + "    cron: nonsense\n", "workloads[0](a).cron: bad cron expression 'nonsense'"),
        (ONE + "    cron: '61 * * * *'\n", "workloads[0](a).cron: bad cron expression '61"),
        (
            ONE + "    cron: '0 0 31 2 *'\n",
            "workloads[0](a).cron: cron expression '0 0 31 2 *' never",
        ),
        (ONE + "    cron: [1]\n", "workloads[0](a).cron: Input should be a valid string"),
        # extra CRIU options: an allow-list
        (ONE + "    criu: {extra_options: [--images-dir=/x]}\n", "criu.extra_options: CRIU option"),
        (ONE + "    criu: {extra_options: [--nope]}\n", "--nope is not allowed; allowed: "),
        (ONE + "    criu: {extra_options: [1]}\n", "criu.extra_options[0]: Input should be"),
        (ONE + "    criu: {extra_options: --force-irmap}\n", "Input should be a valid list"),
    ],
)
def test_values_that_broke_the_daemon_are_config_errors(
    workdir: Path, text: str, expected: str
) -> None:
    msg = config_error(write(workdir, text))
    assert expected in msg, msg
    assert "\n" not in msg


def test_bounds_still_take_sensible_values(workdir: Path) -> None:
    p = write(
        workdir,
        "criu: {timeout: 1d}\nstorage: {gc_grace: 30d, gc_every: 1d, spool_max_bytes: 1.5e+9}\n"
        "workloads:\n  - name: a\n    command: [x]\n    every: 52w\n    jitter: 1h\n"
        "    restore: {backoff_max: 1d}\n    criu: {extra_options: ['--ghost-limit 64M']}\n"
        "  - {name: b, command: [x], cron: '0 0 29 2 *'}\n",
    )
    c = load_config(p)
    assert c.criu.timeout == 86400 and c.workloads[0].every == 52 * 604800
    assert c.storage.spool_max_bytes == 1_500_000_000
    assert c.workloads[0].criu.extra_options == ["--ghost-limit=64M"]
    assert c.workloads[1].cron == "0 0 29 2 *"  # a leap day: it fires


@pytest.mark.parametrize(
    "value", [[1], {"a": 1}, None, True, float("nan"), float("inf"), -1, "1" * 400 + "w", 10**400]
)
def test_parsers_raise_only_value_error(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)
    with pytest.raises(ValueError):
        parse_bytes(value)


def test_doctor_refuses_a_config_with_a_bad_cron(workdir: Path) -> None:
    from click.testing import CliRunner

    from checkpointer.cli.commands import cli

    p = write(workdir, ONE + "    cron: nonsense\n")
    r = CliRunner().invoke(cli, ["doctor", "--config", str(p)])
    assert r.exit_code == 2, r.output
    assert "workloads[0](a).cron: bad cron expression 'nonsense'" in r.output


def test_api_options_are_validated_with_the_same_model() -> None:
    from checkpointer.daemon.main import _options

    with pytest.raises(ConfigError, match=r"every: '1000000w': a duration here must be at most"):
        _options({"every": "1000000w"})
    with pytest.raises(ConfigError, match=r"cron: bad cron expression"):
        _options({"cron": "nonsense"})
    with pytest.raises(ConfigError, match=r"criu.extra_options: CRIU option --pidfile is refused"):
        _options({"criu": {"extra_options": ["--pidfile", "/x"]}})


def test_cli_checks_options_before_asking_the_daemon(workdir: Path) -> None:
    from click.testing import CliRunner

    from checkpointer.cli.commands import cli

    cfg = write(workdir, f"state_dir: {workdir / 'none'}\n")
    for flags, expected in [
        (["--every", "1000000w"], "every: '1000000w': a duration here must be at most 366d"),
        (["--cron", "nonsense"], "cron: bad cron expression 'nonsense'"),
        (["--criu-opt", "--leave-running"], "CRIU option --leave-running is refused"),
        (["--criu-opt", "-v4"], "CRIU option -v4 is refused: the service logs at -v4"),
    ]:
        r = CliRunner().invoke(cli, ["run", "w", "--config", str(cfg), *flags, "--", "true"])
        assert r.exit_code == 2, r.output
        assert expected in r.output and "daemon is not running" not in r.output
