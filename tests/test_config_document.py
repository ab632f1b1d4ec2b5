"""The socket's path as the CLI reads it without the schema (config/document.py): always the
one the daemon listens on (Config.socket_path), and a misspelt key still an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpointer.config import Config, load_config
from checkpointer.config.document import TOP_LEVEL_KEYS, socket_path
from checkpointer.errors import ConfigError

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def test_the_top_level_keys_are_the_models() -> None:
    assert sorted(TOP_LEVEL_KEYS) == sorted(Config.model_fields)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "state_dir: /srv/ckpt\n",
        "state_dir: state\n",
        "state_dir: ../up/state\n",
        "socket: /run/ckpt.sock\nstate_dir: /srv/x\n",
        "socket: rel/api.sock\n",
        "state_dir: /srv/x\nstorage:\n  backend: local\nworkloads: []\n",
    ],
)
def test_the_socket_is_where_the_daemon_listens(
    workdir: Path, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = workdir / "sub" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text(text)
    assert socket_path(cfg) == load_config(cfg).socket_path
    monkeypatch.setenv("CHECKPOINTER_CONFIG", str(cfg))  # no --config: the environment's
    assert socket_path(None) == load_config(cfg).socket_path


def test_bad_socket_settings_name_the_key(workdir: Path) -> None:
    cfg = workdir / "c.yaml"
    for text, words in (
        ("sokcet: /run/x.sock\n", ["sokcet: unknown key", "socket, state_dir"]),
        ("socket: [a, b]\n", ["socket: must be a path"]),
        ("state_dir: 7\n", ["state_dir: must be a path"]),
        ("- a\n", ["the top level must be a mapping"]),
        ("state_dir: [\n", ["is not valid YAML"]),
    ):
        cfg.write_text(text)
        with pytest.raises(ConfigError) as e:
            socket_path(cfg)
        assert str(cfg) in str(e.value) and all(w in str(e.value) for w in words), e.value
        with pytest.raises(ConfigError):  # the schema refuses it too
            load_config(cfg)
