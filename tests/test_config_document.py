"""The socket's path as the CLI reads it without the schema (config/document.py): always the
one the daemon listens on (Config.socket_path), the same one-line error where the daemon
refuses the file, and a misspelt key still an error."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from checkpointer.config import Config, load_config
from checkpointer.config.document import TOP_LEVEL_KEYS, socket_path
from checkpointer.errors import ConfigError

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def test_the_top_level_keys_are_the_models() -> None:
    assert sorted(TOP_LEVEL_KEYS) == sorted(Config.model_fields)


# YAML values of `socket` and `state_dir`: left empty (null), empty text, relative, absolute,
# unusable as a file name, and every other type YAML's safe loader makes.
VALUES = (
    "",
    "~",
    "null",
    "''",
    "' '",
    ".",
    "rel/x",
    "../up",
    "'~/x'",
    "/abs/x",
    "/",
    '"a\\0b"',
    '"/abs/a\\0b"',
    '"/x/\\ud800"',
    '"caf\\u00e9"',
    "7",
    "1.5",
    "true",
    "[a]",
    "{a: 1}",
    "!!binary aGVsbG8=",
    "2020-01-01",
    "!!set {a}",
)
DOCUMENTS = [
    "",
    "state_dir: /srv/x\nstorage:\n  backend: local\nworkloads: []\n",
    *(f"{key}: {value}\n" for key in ("socket", "state_dir") for value in VALUES),
    # both keys: each is checked, whichever one decides the path (the reviewer's case first:
    # both left empty went to /var/lib/checkpointer's daemon, which the daemon refuses)
    *(
        f"socket: {s}\nstate_dir: {d}\n"
        for s, d in itertools.product(("", "''", "/r/x.sock", "7"), ("", "''", "/srv/x", "7"))
    ),
]


def outcome(read: object) -> str:
    """The socket path, or the error a user would see."""
    try:
        return str(read())  # type: ignore[operator]
    except ConfigError as e:
        return f"error: {e}"


@pytest.mark.parametrize("text", DOCUMENTS)
def test_the_cli_and_the_daemon_agree_on_the_socket(
    workdir: Path, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the daemon listens, the CLI connects; where the daemon refuses the file, the CLI
    says the same and connects to nothing (not to the host's default daemon)."""
    cfg = workdir / "sub" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text(text)
    daemon = outcome(lambda: load_config(cfg).socket_path)
    assert outcome(lambda: socket_path(cfg)) == daemon
    if daemon.startswith("error: "):
        assert str(cfg) in daemon and "\n" not in daemon, daemon
        assert any(f": {key}: " in daemon for key in ("socket", "state_dir")), daemon
    monkeypatch.setenv("CHECKPOINTER_CONFIG", str(cfg))  # no --config: the environment's
    assert outcome(lambda: socket_path(None)) == daemon


def test_bad_socket_settings_name_the_key(workdir: Path) -> None:
    cfg = workdir / "c.yaml"
    for text, words in (
        ("sokcet: /run/x.sock\n", ["sokcet: unknown key", "socket, state_dir"]),
        ("socket: [a, b]\n", ["socket: must be a path"]),
        ("state_dir: 7\n", ["state_dir: must be a path"]),
        ("state_dir:\n", ["state_dir: left empty", "/var/lib/checkpointer"]),
        ("- a\n", ["the top level must be a mapping"]),
        ("state_dir: [\n", ["is not valid YAML"]),
    ):
        cfg.write_text(text)
        with pytest.raises(ConfigError) as e:
            socket_path(cfg)
        assert str(cfg) in str(e.value) and all(w in str(e.value) for w in words), e.value
        with pytest.raises(ConfigError):  # the schema refuses it too
            load_config(cfg)


def test_a_config_that_is_not_utf8_is_named(workdir: Path) -> None:
    cfg = workdir / "c.yaml"
    cfg.write_bytes(b"state_dir: /srv/caf\xe9\n")  # Latin-1
    for read in (socket_path, load_config):
        with pytest.raises(ConfigError) as e:
            read(cfg)
        assert str(cfg) in str(e.value) and "not UTF-8" in str(e.value), e.value
