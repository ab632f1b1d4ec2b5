"""Reading the config file: YAML in, a validated Config out, and errors that name the bad
key by its path (with the valid keys for a typo) in one line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from checkpointer.config.document import config_file, read_document
from checkpointer.config.model import Config
from checkpointer.errors import ConfigError


def load_config(path: Path | None) -> Config:
    """Load and validate the config; with no path, the first default that exists, or defaults."""
    path = config_file(path)
    if path is None:
        return Config().resolve_paths(Path.cwd())
    doc = read_document(path)
    try:
        config = Config.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"config file {path}: {format_validation_error(e, doc)}") from e
    return config.resolve_paths(path.resolve().parent)


def format_validation_error(e: ValidationError, doc: Any = None) -> str:
    """One line per problem: the key's path, what is wrong, and for a typo the valid keys."""
    problems = []
    for err in e.errors():
        loc = _loc(err["loc"], doc)
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(err["loc"])
            hint = f" (valid keys here: {', '.join(valid)})" if valid else ""
            problems.append(f"{loc}: unknown key{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(problems)


def _loc(loc: tuple[int | str, ...], doc: Any) -> str:
    out = ""
    node = doc
    for part in loc:
        if isinstance(part, int):
            name = (
                node[part].get("name")
                if isinstance(node, list) and isinstance(node[part], dict)
                else None
            )
            out += f"[{part}]" + (f"({name})" if name else "")
        else:
            out += f".{part}" if out else str(part)
        try:
            node = node[part] if node is not None else None
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def _valid_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return sorted(model.model_fields) if model else []
