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
        raw = path.read_text(encoding="utf-8")  # YAML's own encoding, whatever the locale's
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist; pass an existing --config") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from e
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
    (both, as the daemon does, whichever decides the path) with the model's own rule
    (`path_problem`): a file the daemon refuses is an error here, never the default socket,
    where another daemon may listen. The rest of the file is the daemon's to validate."""
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
    problems = [
        f"{key}: {problem}"
        for key in ("state_dir", "socket")  # the model's order, all of them as it does
        if key in doc and (problem := path_problem(key, doc[key]))
    ]
    if problems:
        raise ConfigError(f"config file {file}: {'; '.join(problems)}")
    base = file.resolve().parent
    socket = _path(doc.get("socket"), base)
    return socket or (_path(doc.get("state_dir"), base) or DEFAULT_STATE_DIR) / SOCKET_NAME


def path_problem(key: str, value: object) -> str | None:
    """Why `value`, the YAML value of `socket` or `state_dir`, is no path the daemon can use,
    or None. The one rule for both readers: Config validates the two keys with it, and
    socket_path reads them with it, so the CLI never takes for "not set" (the default socket,
    perhaps the host's own daemon) a value that the daemon refuses, nor refuses one it takes.

    Null is "not set" for `socket` (STATE_DIR's socket) only: a `state_dir:` left empty is an
    error, as pydantic made it. Empty text is "." (the config's folder), as pydantic's Path
    reads it. A NUL byte or a lone surrogate cannot name a file (the daemon failed on them
    with a traceback, at its start or when it bound the socket)."""
    if value is None:
        if key == "socket":
            return None
        return f"left empty; write a folder, or remove the key for the default {DEFAULT_STATE_DIR}"
    if not isinstance(value, str):
        return f"must be a path, not {type(value).__name__} {value!r}"
    if "\0" in value:
        return f"must be a path, not {value!r} (a file name cannot hold a NUL byte)"
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return f"must be a path, not {value!r} (a lone surrogate is not a character)"
    return None


def _path(value: object, base: Path) -> Path | None:
    """A value path_problem let through, absolute; None for not set."""
    if not isinstance(value, str):
        return None
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


def _one_line(text: str) -> str:
    return " ".join(text.split())
