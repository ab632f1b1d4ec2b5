"""Podman containers (runtime runc), through `podman container checkpoint --export` and
`podman container restore --import`.

The export is a tar of CRIU's images (`checkpoint/`) and Podman's own files (`config.dump`,
`spec.dump`, `network.status`, `rootfs-diff.tar`, ...). Inside a tar, files sit on 512-byte
boundaries, so the tar itself would defeat the repository's 4 KiB page dedup: the folder stored
is the export unpacked, CRIU's images as they are and Podman's files prefixed with
`podman.`; a restore packs them into a tar again. The export holds the rootfs changes against
the base image, not the image itself: a host restoring it needs the base image.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from checkpointer.containers import cgroup_freezer
from checkpointer.containers import podman_config_check as config_check
from checkpointer.containers.base import ContainerError, Problem, Tool, copy_range
from checkpointer.criu import DumpOptions, DumpStats, RestoreStats
from checkpointer.criu.stats import read_dump_stats

PREFIX = "podman."
IMAGES_DIR = "checkpoint"
EMPTY_DIRS = ("artifacts",)
INSTALL = "install Podman and runc (`apt-get install podman runc`, or `make containers`)"
STATS = "stats-dump"  # CRIU's statistics, at the export's top: kept under its own name

log = logging.getLogger(__name__)


class Podman:
    kind = "podman"

    def __init__(self, tool: Tool) -> None:
        self.tool = tool

    def installed(self) -> str | None:
        for exe in ("podman", "runc"):
            if shutil.which(exe) is None:
                return f"{exe} is not installed; {INSTALL}"
        return None

    def inspect(self, container: str) -> dict[str, Any] | None:
        out = self.tool.output(["podman", "container", "inspect", "--format", "json", container])
        if out.returncode != 0:
            return None
        try:
            found = json.loads(out.stdout)
        except ValueError:
            return None
        return (
            found[0] if isinstance(found, list) and found and isinstance(found[0], dict) else None
        )

    def pid(self, container: str) -> int | None:
        info = self.inspect(container)
        state = (info or {}).get("State") or {}
        pid = state.get("Pid")
        return pid if state.get("Running") and isinstance(pid, int) and pid > 0 else None

    def problems(self, container: str) -> list[Problem]:
        missing = self.installed()
        if missing:
            return [Problem("Podman is missing", missing)]
        info = self.inspect(container)
        if info is None:
            return [
                Problem(f"no Podman container {container}", "check the name with `podman ps -a`")
            ]
        runtime = str(info.get("OCIRuntime") or "")
        if runtime != "runc":
            return [
                Problem(
                    f"container {container} runs with OCI runtime {runtime or '(unknown)'}: "
                    "crun on these hosts has no CRIU support (and fails on their cgroup layout)",
                    f"recreate it with `podman run --runtime runc ...` ({INSTALL})",
                )
            ]
        return []

    def checkpoint(self, container: str, images: Path, opts: DumpOptions) -> DumpStats:
        export = images.parent / f"{images.name}.export.tar"
        argv = ["podman", "container", "checkpoint", "--leave-running", "--export", str(export)]
        argv += ["--compress", "none"]
        if opts.tcp_established:
            argv.append("--tcp-established")
        if opts.file_locks:
            argv.append("--file-locks")
        try:
            self.tool.run([*argv, container], container, "dump")
            _unpack_export(export, images)
        finally:
            export.unlink(missing_ok=True)
        return read_dump_stats(images)

    def restore(self, container: str, images: Path, opts: DumpOptions) -> tuple[int, RestoreStats]:
        if self.pid(container) is not None:
            raise ContainerError(
                f"container {container} is running; stop it first (`podman kill {container}`)",
                "running",
            )
        info = self.inspect(container)
        self._check_config(container, images, info)
        export = images.parent / f"{images.name}.import.tar"
        try:
            _pack_export(images, export)
            if info is not None:
                # The dead container's name must be free: the import creates it anew, rootfs
                # changes included, from the base image.
                self.tool.run(
                    ["podman", "rm", "--force", "--time", "0", container], container, "rm"
                )
            argv = ["podman", "container", "restore", "--import", str(export)]
            if opts.tcp_established:
                argv.append("--tcp-established")
            if opts.file_locks:
                argv.append("--file-locks")
            self.tool.run(argv, container, "restore")
        finally:
            export.unlink(missing_ok=True)
        # CRIU restores the freezer state of the dump: a migration's final checkpoint may
        # come back frozen (runc thawed it in every run here; LXC's did not), so thaw it.
        self.thaw(container)
        pid = self.pid(container)
        if pid is None:
            raise ContainerError(
                f"container {container} is not running after its restore; see `podman logs "
                f"{container}`",
                "unknown",
            )
        return pid, RestoreStats(0.0, 0.0, 0)

    def _check_config(self, container: str, images: Path, info: dict[str, Any] | None) -> None:
        """Refuse (before anything is written or removed) a checkpoint whose config.dump or
        spec.dump adds an OCI hook, a host mount or device, or a host path that this host's
        own definition of the container lacks: they would run or mount as root."""
        known = config_check.Known(config_check.local_spec(info), info, self._storage_roots())
        try:
            config = (images / f"{PREFIX}config.dump").read_text(errors="replace")
            spec = (images / f"{PREFIX}spec.dump").read_text(errors="replace")
            found = config_check.refusals(config, spec, known)
        except OSError as e:
            found = [f"the checkpoint lacks Podman's config ({e.strerror}: {e.filename})"]
        except config_check.Refused as e:
            found = [str(e)]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ContainerError(
                f"the checkpoint of Podman container {container} asks for {found[0]}{more}, "
                "which this host's definition of the container does not have: a restore runs "
                "no hook and mounts no host path or device that the host does not already "
                "grant; create the container here with it if it is meant, then restore again",
                "config",
            )

    def _storage_roots(self) -> tuple[str, ...]:
        """Podman's graphRoot and runRoot here: the container's own files live under them."""
        out = self.tool.output(["podman", "info", "--format", "json"])
        try:
            store = json.loads(out.stdout).get("store") or {}
            roots = tuple(str(store[k]) for k in ("graphRoot", "runRoot") if store.get(k))
        except (ValueError, AttributeError):
            roots = ()
        return roots or config_check.Known(None, None).storage_roots

    def stop(self, container: str) -> None:
        self.tool.output(["podman", "kill", container])
        self.tool.output(["podman", "wait", container], timeout=60)

    def freeze(self, container: str) -> bool:
        # `podman pause` makes `podman container checkpoint` refuse the container (Podman
        # records it as paused); runc dumps a cgroup frozen behind Podman's back and leaves it
        # frozen, and `podman kill` ends it frozen (tried on these hosts).
        info = self.inspect(container)
        state = (info or {}).get("State") or {}
        pid, cid = state.get("Pid"), str((info or {}).get("Id") or "")
        if not (state.get("Running") and isinstance(pid, int) and pid > 0 and len(cid) == 64):
            return False
        unsafe = cgroup_freezer.own_cgroup(pid, cid)
        if unsafe:
            log.warning("container %s not frozen for its final checkpoint: %s", container, unsafe)
            return False
        return cgroup_freezer.freeze(pid)

    def thaw(self, container: str) -> None:
        pid = self.pid(container)
        if pid is not None:
            cgroup_freezer.thaw(pid)


def _unpack_export(export: Path, images: Path) -> None:
    """The export's files into `images`, flat: `checkpoint/X` as X, a top-level F as podman.F.
    Anything else (volumes, links, folders we do not know) is refused: a checkpoint we could
    not restore is worse than a failed one."""
    with open(export, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        tar_fd = raw.fileno()
        for member in tar:
            parts = member.name.strip("/").removeprefix("./").split("/")
            if member.isdir() and len(parts) == 1 and parts[0] in (IMAGES_DIR, *EMPTY_DIRS):
                continue
            if member.isreg() and len(parts) == 1:
                target = parts[0] if parts[0] == STATS else PREFIX + parts[0]
            elif member.isreg() and len(parts) == 2 and parts[0] == IMAGES_DIR:
                target = parts[1]
            else:
                raise ContainerError(
                    f"podman's export holds {member.name!r}, which this service does not "
                    "store (a volume or bind mount in the checkpoint?); checkpoint containers "
                    "without volumes, or with `--ignore-volumes` data kept elsewhere",
                    "unsupported",
                )
            fd = os.open(
                images / target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            try:
                _copy_range(tar_fd, fd, member.offset_data, member.size)
            finally:
                os.close(fd)


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    if copy_range(src, dst, offset, size) < size:
        raise ContainerError("podman's export ended early (a truncated tar)", "corrupt-image")


def _pack_export(images: Path, export: Path) -> None:
    """The folder back into the tar `podman container restore --import` reads. Headers come
    from tarfile, file data is copied in the kernel (tarfile's Python copy took 0.8 s for a
    300 MB image)."""
    members: list[tuple[tarfile.TarInfo, str | None]] = []
    for folder in (IMAGES_DIR, *EMPTY_DIRS):
        info = tarfile.TarInfo(folder)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
        members.append((info, None))
    for entry in sorted(os.scandir(images), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False) or entry.name == "stats-restore":
            continue
        if entry.name.startswith(PREFIX) or entry.name == STATS:
            arcname = entry.name.removeprefix(PREFIX)
        else:
            arcname = f"{IMAGES_DIR}/{entry.name}"
        st = entry.stat(follow_symlinks=False)
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = st.st_size, st.st_mode & 0o7777, int(st.st_mtime)
        members.append((info, entry.path))
    fd = os.open(export, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        for info, path in members:
            os.write(fd, info.tobuf(tarfile.PAX_FORMAT))
            if path is None:
                continue
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                _copy_range(src, fd, 0, info.size)
            finally:
                os.close(src)
            if info.size % tarfile.BLOCKSIZE:
                os.write(fd, bytes(tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
        os.write(fd, bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
    finally:
        os.close(fd)
