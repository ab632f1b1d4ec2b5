"""The command line: commands (click), the daemon client, and how results are rendered."""

from checkpointer.cli.commands import cli, main

__all__ = ["cli", "main"]
