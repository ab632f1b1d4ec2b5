"""The command line: commands (click), the daemon client, and how results are rendered."""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.cli.commands import cli, main

_WHERE = {
    "cli": "checkpointer.cli.commands",
    "main": "checkpointer.cli.commands",
}

__getattr__ = lazy_exports(__name__, _WHERE)  # names load on first use


__all__ = [
    "cli",
    "main",
]
