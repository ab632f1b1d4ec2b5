"""`checkpointer doctor`: is this host ready, and if not, what fixes it."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from checkpointer.config import Config
from checkpointer.criu import Criu, CriuError
from checkpointer.criu.driver import INSTALL_HINT

TESTED_CRIU = "4.2.1"
"""The CRIU version the test suite ran on; scripts/install-criu.sh builds it, or a newer one
when Debian no longer offers it."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_checks(config: Config) -> list[Check]:
    checks = [Check("kernel", True, platform.release(), required=False)]
    root = os.geteuid() == 0
    checks.append(
        Check(
            "root",
            root,
            "running as root" if root else f"uid {os.geteuid()}",
            "" if root else "run checkpointer as root (CRIU needs CAP_SYS_ADMIN)",
        )
    )
    criu = Criu(config.criu.binary, config.state_dir / "logs" / "criu-failed")
    try:
        version = criu.require_version()
        where = shutil.which(config.criu.binary) or config.criu.binary
        checks.append(
            Check("criu version", True, f"criu {version} at {where} (tested: {TESTED_CRIU})")
        )
        ok, text = criu.check()
        checks.append(
            Check(
                "criu check",
                ok,
                "passes" if ok else _last_line(text),
                "" if ok else "run `criu check` to see what the kernel lacks",
            )
        )
        dirty, _ = criu.check(["--feature", "mem_dirty_track"])
        checks.append(
            Check(
                "dirty memory tracking",
                dirty,
                "available"
                if dirty
                else "not available: every dump is a full memory dump "
                "(deduplication in storage still uploads only changed pages)",
                "" if dirty else "needs CONFIG_MEM_SOFT_DIRTY in the kernel",
                required=False,
            )
        )
    except CriuError as e:
        checks.append(Check("criu version", False, str(e), INSTALL_HINT))
    checks.append(_folder_check("state folder", config.state_dir))
    checks.append(_folder_check("repository (local folder)", config.repository_path))
    checks.append(_key_check(config))
    return checks


def _key_check(config: Config) -> Check:
    """The access key is there and only ours (the daemon refuses it otherwise)."""
    from checkpointer.repository_key import RepositoryKeyError, find_secret

    if not config.storage.encryption:
        return Check("repository key", True, "encryption is off: checkpoints stored in clear")
    try:
        source = find_secret(config)
    except RepositoryKeyError as e:
        return Check("repository key", False, str(e), "fix the key file (README: Encryption)")
    if source is None:
        return Check(
            "repository key",
            True,
            f"{config.storage.key_file} does not exist yet: the daemon makes it with a new "
            "repository (a repository that has keys needs a copy of one)",
            required=False,
        )
    return Check("repository key", True, f"{source.secret.kind} from {source.where}")


def _folder_check(name: str, path: Path) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return Check(
            name,
            False,
            f"{path}: {probe} is not writable",
            f"make {probe} writable by root, or point the config elsewhere",
        )
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            return Check(
                name,
                False,
                f"{path} is mode {mode:o}: others can read checkpoints "
                "(process memory, secrets included)",
                f"chmod 700 {path}",
            )
        return Check(name, True, f"{path} (mode {mode:o})")
    return Check(name, True, f"{path} (created 0700 on first use)")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "failed"
