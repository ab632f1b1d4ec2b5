"""The config's schema: every key with its type, default and description (docs/configuration.md
is written from it by config/reference.py); loading.py reads the file into it.

Relative paths in the file are taken relative to the file's own folder, so a config works the
same from any working directory.
"""

from __future__ import annotations

import socket
from pathlib import Path, PurePath
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from checkpointer.config.cron import check_cron
from checkpointer.config.document import DEFAULT_STATE_DIR, SOCKET_NAME, path_problem
from checkpointer.config.drill import DrillPolicy
from checkpointer.config.types import (
    MAX_INTERVAL,
    ByteSize,
    Duration,
    FilePath,
    Interval,
    Timeout,
)
from checkpointer.criu.options import check_extra_options
from checkpointer.errors import ConfigError
from storage import retention
from storage.keys import check_host_id
from storage.manifest import check_workload_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CriuOptions(_Strict):
    """Per-workload CRIU options: resources CRIU refuses unless told how to handle them."""

    tcp_established: bool = Field(False, description="dump and restore established TCP connections")
    file_locks: bool = Field(False, description="dump and restore file locks (flock, fcntl)")
    ext_unix_sk: bool = Field(False, description="allow unix sockets connected outside the tree")
    shell_job: bool = Field(False, description="the tree belongs to a terminal session")
    tcp_close: bool = Field(False, description="restore established TCP connections closed")
    extra_options: list[str] = Field(
        default_factory=list,
        description="more CRIU options, from an allow-list (criu/options.py), e.g. "
        "--manage-cgroups=full, --ghost-limit=64M; kept in canonical --opt=value form",
    )

    @field_validator("extra_options")
    @classmethod
    def _extra_options(cls, v: list[str]) -> list[str]:
        return check_extra_options(v)


class Retention(_Strict):
    """restic's `forget` rules, ORed (see storage/retention.py); UTC calendar buckets. The one
    model of a retention policy: storage/ reads it through `retention.RetentionPolicy`."""

    keep_last: int | None = Field(None, ge=1, description="the N newest checkpoints")
    keep_hourly: int | None = Field(
        None, ge=1, description="the newest of each of the last N hours"
    )
    keep_daily: int | None = Field(None, ge=1, description="the newest of each of the last N days")
    keep_weekly: int | None = Field(
        None, ge=1, description="the newest of each of the last N weeks"
    )
    keep_monthly: int | None = Field(
        None, ge=1, description="the newest of each of the last N months"
    )
    keep_yearly: int | None = Field(
        None, ge=1, description="the newest of each of the last N years"
    )
    keep_within: Duration | None = Field(None, description="every checkpoint this recent")
    max_total_bytes: ByteSize | None = Field(
        None, description="then the oldest kept ones removed until their images' sizes fit"
    )

    @model_validator(mode="after")
    def _not_empty(self) -> Retention:
        retention.check_policy(self)
        return self


class RestorePolicy(_Strict):
    """When and how a dead tree is brought back (checkpointer/engine/policy.py decides)."""

    on_crash: bool = Field(True, description="restore by itself when the tree dies")
    on_clean_exit: bool = Field(False, description="treat exit status 0 as a crash too")
    crash_window: Duration = Field(60.0, description="a death this soon after a restore is a loop")
    backoff_initial: Duration = Field(1.0, description="wait before the 2nd attempt of a loop")
    backoff_max: Duration = Field(300.0, description="longest wait between attempts")
    max_depth: int = Field(3, ge=1, description="checkpoints tried, newest first, in a loop")
    cold_start: bool = Field(True, description="managed: start from the command after that")
    max_attempts: int = Field(5, ge=1, description="attempts in one streak before `failed`")
    lazy: bool = Field(
        False, description="from the repository: start the tree first, its pages on demand"
    )
    lazy_after_reboot: bool = Field(
        True,
        description="from a disk image after a reboot: start the tree first, each page "
        "checked as it is read (process trees; containers restore in full)",
    )


class WorkloadOptions(_Strict):
    """How a workload is checkpointed and restored, whichever way it was registered."""

    every: Interval | None = Field(None, description="checkpoint this often (e.g. 5m)")
    cron: str | None = Field(None, description="or at these times (5-field cron, UTC)")
    jitter: Interval | None = Field(None, description="random delay added to each run")
    criu: CriuOptions = Field(default_factory=CriuOptions)
    retention: Retention | None = Field(None, description="default: the top-level retention")
    restore: RestorePolicy = Field(default_factory=RestorePolicy)
    drill: DrillPolicy = Field(default_factory=DrillPolicy)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_cron(v)
            except ConfigError as e:
                raise ValueError(str(e)) from e
        return v

    @field_validator("restore")
    @classmethod
    def _restore_delays(cls, v: RestorePolicy) -> RestorePolicy:
        # They end in threading.Timer and in time arithmetic: the bound of Interval.
        for key in ("crash_window", "backoff_initial", "backoff_max"):
            if getattr(v, key) > MAX_INTERVAL:
                raise ValueError(f"{key}: a delay of the restore policy must be at most 366d")
        return v

    @model_validator(mode="after")
    def _one_schedule(self) -> WorkloadOptions:
        if self.every is not None and self.cron is not None:
            raise ValueError("give at most one of every and cron")
        return self


class WorkloadConfig(WorkloadOptions):
    """A workload declared in the config: managed (`command`), adopted (`pid`/`pidfile`) or a
    container (`lxc`/`podman`: its name in that runtime)."""

    name: str = Field(description="the workload's name in every command and in the repository")
    command: list[str] | None = Field(None, description="managed: the program and its arguments")
    cwd: FilePath | None = Field(
        None, description="managed: working directory (the config's folder)"
    )
    env: dict[str, str] = Field(default_factory=dict, description="managed: environment added")
    pid: int | None = Field(None, description="adopted: the root process of the tree")
    pidfile: FilePath | None = Field(None, description="adopted: a file holding that PID")
    lxc: str | None = Field(None, description="an LXC container's name")
    podman: str | None = Field(None, description="a Podman container's name (runtime runc)")

    def options(self) -> WorkloadOptions:
        return WorkloadOptions.model_validate(
            self.model_dump(include=set(WorkloadOptions.model_fields))
        )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_workload_name(v)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("command must name a program to run")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadConfig:
        sources = [
            x
            for x in (self.command, self.pid, self.pidfile, self.lxc, self.podman)
            if x is not None
        ]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of command (managed), pid or pidfile (adopted), "
                "lxc or podman (a container)"
            )
        return self


class S3Config(_Strict):
    """An S3 bucket (or an S3-compatible server) holding the repository."""

    bucket: str = Field(description="the bucket (it must exist)")
    prefix: str = Field("", description="a folder in the bucket for this repository")
    endpoint_url: str | None = Field(None, description="for S3-compatible servers")
    region: str | None = Field(None, description="the bucket's region (default: boto3's)")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="bucket in the path or in the host name (boto3's choice by default)"
    )
    profile: str | None = Field(None, description="a profile of ~/.aws/config")
    access_key_id: str | None = Field(None, description="prefer the AWS credential chain")
    secret_access_key: str | None = Field(None, description="with access_key_id")
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="S3's own encryption")
    sse_kms_key_id: str | None = Field(None, description="the KMS key, with sse: aws:kms")
    create_only: bool = Field(True, description="send If-None-Match: * on uploads")
    multipart_threshold: ByteSize = Field(64 * 1024**2, description="larger uploads in parts")
    multipart_chunk: ByteSize = Field(16 * 1024**2, description="the size of those parts")
    connect_timeout: Duration = Field(10.0, description="of one connection to S3")
    read_timeout: Duration = Field(60.0, description="of one read from S3")


class RetryConfig(_Strict):
    """How storage operations are retried (with back-off) before they fail."""

    attempts: int = Field(5, ge=1, description="tries of one operation, the first included")
    max_delay: Duration = Field(60.0, description="give up retrying one operation after this")


class StorageConfig(_Strict):
    """Where checkpoints are stored: the repository."""

    backend: Literal["local", "s3"] = Field("local", description="a local folder, or S3")
    path: FilePath | None = Field(None, description="local: repository folder")
    s3: S3Config | None = None
    cache_dir: FilePath | None = Field(None, description="s3: spool and cache; STATE_DIR/cache")
    spool_max_bytes: ByteSize = Field(10 * 1024**3, description="s3: un-uploaded backlog cap")
    cache_max_bytes: ByteSize = Field(2 * 1024**3, description="s3: local copies kept")
    concurrency: int = Field(4, ge=1, le=64, description="packs uploaded/downloaded at once")
    retries: RetryConfig = Field(default_factory=RetryConfig)
    gc_grace: Duration = Field(6 * 3600.0, description="unreferenced packs younger are kept")
    gc_every: Interval | None = Field(3600.0, description="garbage collection interval")
    encryption: bool = Field(
        True,
        description="seal every object (AES-256-GCM) and key chunk ids (docs/storage.md)",
    )
    key_file: FilePath = Field(
        Path("/etc/checkpointer/repository.key"),
        description="the repository access key (0600, root's); made with a new repository",
    )
    passphrase_file: FilePath | None = Field(
        None, description="open the repository with a passphrase (scrypt) instead of key_file"
    )

    @model_validator(mode="after")
    def _s3_needs_settings(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs an s3: section with at least bucket")
        return self


class CriuConfig(_Strict):
    """How CRIU is run, for every workload."""

    binary: str = Field("criu", description="the criu program (a path, or found on PATH)")
    scratch_dir: FilePath | None = Field(
        None, description="where images are dumped before storing; default a tmpfs if it has room"
    )
    timeout: Timeout = Field(
        600.0, description="a dump or restore running longer is killed; at most 1d"
    )
    keep_latest_image: bool = Field(
        True, description="keep each workload's newest image in scratch for fast restores"
    )
    disk_images: int = Field(
        2,
        ge=0,
        le=8,
        description="newest images also kept on disk (STATE_DIR/images, unencrypted, 0700): "
        "restores after a reboot and rollbacks read them; 0 keeps none",
    )


class HostConfig(_Strict):
    """This host."""

    id: str = Field(default_factory=socket.gethostname, description="this host's name in the fleet")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return check_host_id(v)


class FleetConfig(_Strict):
    """Several hosts on one bucket (docs/fleet-guide.md). Needs S3 with conditional writes."""

    enabled: bool = Field(False, description="one owner per workload, kept as a lease")
    failover: bool = Field(False, description="take over workloads whose owner's lease expired")
    lease_ttl: Interval = Field(30.0, description="a lease not renewed for this long expires")
    renew_every: Interval = Field(10.0, description="leases renewed, hand-overs looked for")
    clock_skew: Interval = Field(
        5.0, description="clocks of the fleet's hosts differ by less than this"
    )
    # A dead host is found up to one scan late (its last heartbeat is first seen at the next
    # listing): failover takes TTL + up to scan_every + the takeover's requests. 3 s keeps it
    # within TTL + 5 s and liveness at ~$0.013 per host-hour (bench.fleet_scale, one LIST per
    # scan at $0.005/1000 is $0.006 of it; 2 s would be $0.009, over the $0.015 budget).
    scan_every: Interval = Field(
        3.0, description="other hosts' heartbeats listed (at least once per renew_every)"
    )

    @model_validator(mode="after")
    def _renew_well_before_expiry(self) -> FleetConfig:
        if self.renew_every + self.clock_skew >= self.lease_ttl:
            raise ValueError(
                "fleet.renew_every + fleet.clock_skew must be less than fleet.lease_ttl "
                "(a lease would expire between renewals)"
            )
        if self.scan_every >= self.lease_ttl:
            raise ValueError(
                "fleet.scan_every must be less than fleet.lease_ttl (a dead host would be "
                "found more than a TTL late): set it to a few seconds"
            )
        return self


class ShutdownConfig(_Strict):
    """The final checkpoints of a planned shutdown (docs/restores.md, Daemon restart and reboot)."""

    budget: Interval = Field(
        90.0,
        description="final checkpoints at a system shutdown take at most this long; below the "
        "unit's TimeoutStopSec (120s), which also covers a dump still running at the end and "
        "the daemon's own exit",
    )


class MetricsConfig(_Strict):
    """The Prometheus endpoint (docs/metrics.md)."""

    enabled: bool = Field(True, description="serve Prometheus metrics over HTTP")
    address: str = Field("127.0.0.1", description="loopback by default: put a proxy in front")
    port: int = Field(9467, ge=0, le=65535, description="their TCP port")


class Config(_Strict):
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="the daemon's own files")
    socket: Path | None = Field(None, description="the API socket (STATE_DIR/checkpointer.sock)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    criu: CriuConfig = Field(default_factory=CriuConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    retention: Retention = Field(default_factory=lambda: Retention(keep_last=10))
    workloads: list[WorkloadConfig] = Field(default_factory=list)

    @field_validator("state_dir", "socket", mode="before")
    @classmethod
    def _usable_path(cls, v: object, info: ValidationInfo) -> object:
        # The CLI reads these two without the schema (document.socket_path): one rule for both.
        problem = path_problem(info.field_name or "", str(v) if isinstance(v, PurePath) else v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for w in self.workloads:
            if w.name in seen:
                raise ValueError(f"workload {w.name!r} is declared twice")
            seen.add(w.name)
        return self

    @model_validator(mode="after")
    def _fleet_needs_encryption(self) -> Config:
        # In clear, whoever can write the bucket can hand a host a lease together with a
        # planted checkpoint, which that host then restores as root (issue 26).
        if self.fleet.enabled and not self.storage.encryption:
            raise ValueError(
                "fleet.enabled needs storage.encryption (it is false): in clear, anyone who "
                "can write the bucket can hand a host a lease with a planted checkpoint to "
                "restore. To migrate to an encrypted repository: point storage.s3.bucket or "
                "storage.s3.prefix at a new, empty location with storage.encryption: true "
                "(the first daemon to start creates the repository there and writes its key "
                "file: copy that file to the other hosts) and start the workloads there; the "
                "old checkpoints stay readable at the old location with encryption: false and "
                "fleet off (docs/storage.md, Encryption: repositories written in clear)"
            )
        return self

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / SOCKET_NAME  # as document.socket_path

    @property
    def repository_path(self) -> Path:
        return self.storage.path or self.state_dir / "repository"

    @property
    def cache_path(self) -> Path:
        return self.storage.cache_dir or self.state_dir / "cache"

    def resolve_paths(self, base: Path) -> Config:
        """Make every relative path absolute against `base` (the config file's folder)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p).resolve())

        self.state_dir = fix(self.state_dir) or self.state_dir
        self.socket = fix(self.socket)
        self.storage.path = fix(self.storage.path)
        self.storage.cache_dir = fix(self.storage.cache_dir)
        self.storage.key_file = fix(self.storage.key_file) or self.storage.key_file
        self.storage.passphrase_file = fix(self.storage.passphrase_file)
        self.criu.scratch_dir = fix(self.criu.scratch_dir)
        for w in self.workloads:
            w.cwd = fix(w.cwd) if w.cwd else base
            w.pidfile = fix(w.pidfile)
        return self
