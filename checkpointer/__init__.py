"""checkpointer: periodic CRIU checkpoints of Linux process trees, restored by themselves."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's `__getattr__` (PEP 562) that loads each exported name from its module on
    first use. Why: a package whose `__init__` imports its modules eagerly loads all of them for
    any one (the lazy restore's guard must start in milliseconds), and every module importing a
    sibling through the package closes an import circle through `__init__`."""

    def get(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return get
