"""Where the project and the tests' programs are, and the CLI as the tests run it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "checkpointer.cli"]
COUNTER = ROOT / "examples" / "counter_server.py"
PROGRAMS = ROOT / "tests" / "programs"
