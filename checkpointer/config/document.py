"""The config file before its schema: which file, its YAML as a mapping of keys, and where the
daemon's socket is.

Apart from the schema (model.py, pydantic) because most commands need only the socket:
`checkpointer status`, `restore` and the other commands that talk to the daemon read the
socket's path here and never import pydantic, which took ~0.27 s of the CLI's ~0.5 s start
(measured with `python -X importtime`), time added to every command and to every restore's
command-to-first-answer. The daemon, `doctor` and `key` read the whole config (loading.py),
and the daemon validates it all when it starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from checkpointer.errors import ConfigError

DEFAULT_CONFIG_PATHS = (Path("/etc/checkpointer/config.yaml"),)
DEFAULT_STATE_DIR = Path("/var/lib/checkpointer")
SOCKET_NAME = "checkpointer.sock"

# Config's top-level keys (tests/test_config_document.py holds them equal to the model's): a
# misspelt `socket:` must be an error here too, not a silent default socket.
TOP_LEVEL_KEYS = (
    "criu",
    "fleet",
    "host",
    "metrics",
    "retention",
    "shutdown",
    "socket",
    "state_dir",
    "storage",
    "workloads",
)


def config_file(path: Path | None) -> Path | None:
    """The file to read: `path`, else $CHECKPOINTER_CONFIG, else the first default that
    exists; None for none (built-in defaults)."""
    if path is not None:
        return path
    env = os.environ.get("CHECKPOINTER_CONFIG")
    return Path(env) if env else next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)


def read_document(path: Path) -> dict[str, Any]:
    """The file's YAML, a mapping of keys (empty for an empty file); ConfigError naming the
    file for one that is missing, unreadable, not YAML or not a mapping."""
    try:
        raw = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist; pass an existing --config") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(str(e))}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
    return doc


def socket_path(path: Path | None) -> Path:
    """The daemon's API socket as the config at `path` (see `config_file`) sets it: `socket`,
    else STATE_DIR/checkpointer.sock, relative paths against the file's folder, as the
    daemon reads them (Config.socket_path). Checks the top-level keys and these two values
    only: the rest of the file is the daemon's to validate."""
    file = config_file(path)
    if file is None:
        return DEFAULT_STATE_DIR / SOCKET_NAME
    doc = read_document(file)
    unknown = sorted(str(k) for k in doc if k not in TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"config file {file}: {unknown[0]}: unknown key "
            f"(valid keys here: {', '.join(TOP_LEVEL_KEYS)})"
        )
    base = file.resolve().parent
    socket = _path(file, doc, "socket", base)
    return socket or (_path(file, doc, "state_dir", base) or DEFAULT_STATE_DIR) / SOCKET_NAME


def _path(file: Path, doc: dict[str, Any], key: str, base: Path) -> Path | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"config file {file}: {key}: must be a path, not {value!r}")
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


def _one_line(text: str) -> str:
    return " ".join(text.split())
