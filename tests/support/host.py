"""What a test that runs CRIU needs of the machine: root, and criu on the PATH."""

from __future__ import annotations

import os
import shutil


def require_root_and_criu() -> None:
    """Fail (never skip) the calling test unless it runs as root with criu installed: under
    `make test`, which runs as root and builds CRIU, a missing criu must fail loudly. Pure unit
    tests never call this, so they run as any user."""
    import pytest  # here, not above: bench/ imports tests.support and needs no pytest

    if os.geteuid() != 0:
        pytest.fail("this test runs CRIU and must run as root", pytrace=False)
    if shutil.which("criu") is None:
        pytest.fail("criu is not installed: run `make test`, which builds it", pytrace=False)
