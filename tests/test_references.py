"""References that cannot drift: docs/configuration.md and docs/cli.md are what their
generators print from the config model and the click commands (`make docs` writes them), every
config key has a description and every option help text, and every YAML file shipped in
configs/ and examples/ is valid for what reads it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from checkpointer.cli import reference as cli_reference
from checkpointer.config import load_config
from checkpointer.config import reference as config_reference
from tests.support.paths import ROOT

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

# Every YAML file shipped, by what reads it: a new one must be added here to be checked.
CHECKPOINTER_CONFIGS = {"configs/checkpointer.yaml", "configs/demo.yaml", "configs/s3.yaml"}
PROMETHEUS_CONFIGS = {"configs/prometheus.yml"}
PROMETHEUS_RULES = {"configs/prometheus-alerts.yaml"}


@pytest.mark.parametrize(
    ("doc", "render"),
    [("configuration.md", config_reference.render), ("cli.md", cli_reference.render)],
)
def test_the_generated_reference_is_up_to_date(doc: str, render: Callable[[], str]) -> None:
    path = ROOT / "docs" / doc
    assert path.exists() and path.read_text() == render(), (
        f"docs/{doc} is not what the code says: run `make docs` and commit it"
    )


def test_every_config_key_has_a_description() -> None:
    assert config_reference.undescribed() == [], (
        "give these keys a Field(description=...) (sections: a docstring) in checkpointer/config/"
    )


def test_every_cli_option_has_help_text() -> None:
    assert cli_reference.options_without_help() == [], "give these options help=..."


def test_every_shipped_yaml_is_known_here() -> None:
    shipped = {
        str(p.relative_to(ROOT))
        for folder in ("configs", "examples")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".yaml", ".yml")
    }
    known = CHECKPOINTER_CONFIGS | PROMETHEUS_CONFIGS | PROMETHEUS_RULES
    assert shipped == known, "add new YAML files to this test's lists, say what reads them"


@pytest.mark.parametrize("name", sorted(CHECKPOINTER_CONFIGS))
def test_a_shipped_config_loads_and_validates(name: str) -> None:
    config = load_config(ROOT / name)
    assert config.state_dir.is_absolute()


@pytest.mark.parametrize(
    ("name", "check"),
    [(n, "config") for n in sorted(PROMETHEUS_CONFIGS)]
    + [(n, "rules") for n in sorted(PROMETHEUS_RULES)],
)
def test_a_shipped_prometheus_file_is_valid(name: str, check: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs prometheus"
    # The config's rule_files are where a server installs them: check its syntax alone.
    args = ["--syntax-only"] if check == "config" else []
    r = subprocess.run(
        [promtool, "check", check, *args, str(ROOT / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
