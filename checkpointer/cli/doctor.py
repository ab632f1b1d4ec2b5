"""`checkpointer doctor`: is this host ready, and if not, what fixes it."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from checkpointer.config import Config
from checkpointer.criu import Criu, CriuError, kdat_cache
from checkpointer.criu.failures import INSTALL_HINT
from storage.backends import BlobStore

TESTED_CRIU = "4.2.1"
"""The CRIU version the test suite ran on; scripts/install-criu.sh builds it, or a newer one
when Debian no longer offers it."""

UNIT_ENV_FILE = Path("/etc/checkpointer/env")
"""The systemd unit's EnvironmentFile (S3 credentials, a repository key): doctor, started from
a shell, reads it too, so that it checks the storage with what the daemon will use."""


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
    checks += _unit_environment(UNIT_ENV_FILE)
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
        cached, detail = kdat_cache.status(criu.exe())
        checks.append(
            Check(
                "criu probe cache",
                cached,
                detail,
                "" if cached else "the daemon mounts it as it starts (or run `make setup`)",
                required=False,
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
    checks.append(_key_check(config))
    checks += storage_checks(config)
    checks += _container_checks(config)
    return checks


def _container_checks(config: Config) -> list[Check]:
    """The runtimes (required only when the config declares their containers), what their
    defaults would break, and every declared container's known problems."""
    from checkpointer import containers
    from checkpointer.containers import lxc_config

    runtimes = containers.runtimes(config.state_dir / "logs" / "container-failed")
    declared = {
        kind: [(wc.name, c) for wc in config.workloads if (c := getattr(wc, kind)) is not None]
        for kind in containers.KINDS
    }
    checks = []
    for kind, runtime in runtimes.items():
        missing = runtime.installed()
        required = bool(declared[kind])
        if missing:
            checks.append(Check(kind, False, missing, "`make containers` installs it", required))
            continue
        checks.append(Check(kind, True, _tool_version(kind), required=False))
        for name, container in declared[kind]:
            problems = runtime.problems(container)
            checks.append(
                Check(
                    f"workload {name} ({kind} {container})",
                    not problems,
                    "; ".join(p.what for p in problems) or "no known problem",
                    "; ".join(p.fix for p in problems),
                )
            )
    default_conf = Path("/etc/lxc/default.conf")
    if shutil.which("lxc-create") and default_conf.is_file():
        problems = lxc_config.problems(lxc_config.read(default_conf))
        problems = [p for p in problems if "lxc.rootfs.path" not in p.what]
        checks.append(
            Check(
                "lxc defaults",
                not problems,
                "; ".join(p.what for p in problems)
                or f"{default_conf}: nothing new containers inherit is known to fail",
                "; ".join(p.fix for p in problems)
                + (" (new containers copy these lines from lxc-create)" if problems else ""),
                required=False,
            )
        )
    if shutil.which("podman"):
        default = _podman_default_runtime()
        ok = default == "runc"
        checks.append(
            Check(
                "podman runtime",
                ok,
                f"default OCI runtime: {default or 'unknown'}"
                + ("" if ok else " (crun here has no CRIU support)"),
                "" if ok else "create containers with `podman run --runtime runc ...`",
                required=False,
            )
        )
    return checks


def _tool_version(kind: str) -> str:
    from checkpointer.host import children

    cmd = ["lxc-start", "--version"] if kind == "lxc" else ["podman", "--version"]
    runc = ""
    if kind == "podman" and shutil.which("runc"):
        out = children.run(["runc", "--version"], timeout=30, capture_output=True)
        runc = ", " + (out.stdout.splitlines() or ["runc"])[0]
    try:
        out = children.run(cmd, timeout=30, capture_output=True)
    except OSError as e:
        return f"{cmd[0]}: {e}"
    return (out.stdout.strip().splitlines() or ["installed"])[0] + runc


def _podman_default_runtime() -> str | None:
    from checkpointer.host import children

    try:
        out = children.run(
            ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
            timeout=60,
            capture_output=True,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def storage_checks(config: Config) -> list[Check]:
    """The configured storage, for real and without writing to it (but for the fleet's
    conditional-write probe, which the daemon runs at every start too): the bucket answers,
    the credentials are accepted, and the configured key opens the repository."""
    if config.storage.backend == "local":
        path = config.repository_path
        checks = [_folder_check("repository (local folder)", path)]
        if path.is_dir():  # opening a LocalBlobStore creates a missing folder
            from storage.backends import LocalBlobStore

            checks.append(_repository_check(config, LocalBlobStore(path)))
        return checks
    from checkpointer.repository.stack import remote_store
    from storage.errors import StorageAccessError, StorageError, TransientStorageError

    # One attempt: the daemon's retries (up to a minute) would only make doctor slow to say
    # what one request already says.
    s = config.storage
    once = config.model_copy(
        update={
            "storage": s.model_copy(
                update={"retries": s.retries.model_copy(update={"attempts": 1})}
            )
        }
    )
    try:
        store = remote_store(once, None)
        where = store.describe()
        store.check()
    except StorageAccessError as e:
        missing = "does not exist" in str(e)
        return [
            Check(
                "s3 bucket" if missing else "s3 credentials",
                False,
                str(e),
                "create the bucket, or fix storage.s3.bucket (and storage.s3.prefix)"
                if missing
                else "put the right AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                f"in {UNIT_ENV_FILE}, which the unit passes to the daemon, and check the "
                "bucket policy allows List, Get, Put and Delete under the prefix",
            )
        ]
    except TransientStorageError as e:
        return [
            Check(
                "s3 bucket",
                False,
                f"unreachable: {e}",
                "check the endpoint (storage.s3.endpoint_url, region) and the network path to "
                "it; the daemon starts anyway and spools checkpoints until it answers",
            )
        ]
    except StorageError as e:
        return [Check("s3 bucket", False, str(e), "see the S3 error code above")]
    checks = [Check("s3 bucket", True, f"{where}: bucket reachable, credentials accepted")]
    if config.fleet.enabled:
        checks.append(_conditional_writes_check(store))
    checks.append(_repository_check(config, store))
    return checks


def _conditional_writes_check(store: BlobStore) -> Check:
    from storage.errors import ConditionalWritesUnsupported, StorageError
    from storage.leases import probe_conditional_writes

    try:
        probe_conditional_writes(store)
    except (ConditionalWritesUnsupported, StorageError) as e:
        return Check(
            "conditional writes",
            False,
            str(e),
            "fleet mode needs a store that enforces If-None-Match and If-Match "
            "(docs/fleet-guide.md); set fleet.enabled: false, or move the bucket to one that does",
        )
    return Check(
        "conditional writes",
        True,
        "enforced (create-only and If-Match puts, also with concurrent writers): leases hold",
    )


def _repository_check(config: Config, backend: BlobStore) -> Check:
    """Open the repository as the daemon will, but never create one, nor a key file."""
    from checkpointer.repository.key import RepositoryKeyError, open_codec
    from storage import keyring
    from storage.errors import StorageError

    where = backend.describe()
    try:
        if keyring.is_new(backend):
            made = config.storage.encryption and not config.storage.key_file.exists()
            return Check(
                "repository",
                True,
                f"no repository at {where} yet: the daemon creates it at its first start"
                + (f" and writes its key to {config.storage.key_file}" if made else ""),
                required=False,
            )
        opened = open_codec(config, backend, socket.gethostname(), create=False)
    except RepositoryKeyError as e:
        return Check(
            "repository",
            False,
            str(e),
            "use this repository's key file, from the host that created it or your backup "
            "(docs/storage.md, Encryption)",
        )
    except StorageError as e:
        return Check("repository", False, f"{where}: {e}", "check the storage (above)")
    if opened.key_id is None:
        return Check("repository", True, f"{where}: opened, not encrypted")
    return Check("repository", True, f"{where}: opened with key {opened.key_id}")


def _unit_environment(path: Path) -> list[Check]:
    """Take the variables of the unit's EnvironmentFile that this shell does not set."""
    try:
        text = path.read_text()
    except OSError:
        return []
    taken = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if name and name not in os.environ:
            os.environ[name] = value
            taken.append(name)
    detail = f"{path}: " + (", ".join(sorted(taken)) if taken else "nothing new to this shell")
    return [Check("unit environment", True, detail, required=False)]


def _key_check(config: Config) -> Check:
    """The access key is there and only ours (the daemon refuses it otherwise)."""
    from checkpointer.repository.key import RepositoryKeyError, find_secret

    if not config.storage.encryption:
        return Check("repository key", True, "encryption is off: checkpoints stored in clear")
    try:
        source = find_secret(config)
    except RepositoryKeyError as e:
        return Check(
            "repository key", False, str(e), "fix the key file (docs/storage.md, Encryption)"
        )
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
