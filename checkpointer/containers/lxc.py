"""LXC containers, through `lxc-checkpoint` (LXC 5.0 runs CRIU with the container's mounts,
namespaces and cgroups).

A checkpoint folder holds CRIU's images (`lxc-checkpoint -D`), the container's config
(`lxc.config`) and its rootfs (`lxc.rootfs.tar`, 4 KiB-aligned: an unchanged rootfs costs no
storage after the first checkpoint). That is enough to bring the container back on a host
that has neither: the restore writes the config (its rootfs line pointing at this host's
copy) and replaces the rootfs with the checkpoint's, so memory and files are from the same
moment (files the container changed after the checkpoint go back with it).

The rootfs is archived just after CRIU's dump, while the container runs again: a file it
changes in that window is newer in the archive than in memory (Podman's export has the same
window). CRIU checks the size of every file the container holds open; one that grew in the
window makes that checkpoint's restore fail with `file-changed`, and the restore policy
moves on to the one before. A migration's final checkpoint has no such window: the container
is frozen (`freeze`) before the dump and stays frozen until it is killed after the hand-over.

A restore writes the checkpoint's config only if it adds no hook and no host path that this
host's config for the container lacks (lxc_config.added_host_access).
"""

from __future__ import annotations

import os
import shutil
from functools import cached_property
from pathlib import Path

from checkpointer.containers import lxc_config, rootfs_archive, rootfs_extract
from checkpointer.containers.base import ContainerError, Problem, Tool
from checkpointer.criu import DumpOptions, DumpStats, RestoreStats
from checkpointer.criu.failures import CriuFailure
from checkpointer.criu.images.stats import read_dump_stats, read_restore_stats

CONFIG = "lxc.config"
ROOTFS = "lxc.rootfs.tar"
INSTALL = "install LXC (`apt-get install lxc`, or `make containers`)"


class Lxc:
    kind = "lxc"

    def __init__(self, tool: Tool, lxc_path: Path | None = None) -> None:
        self.tool = tool
        self._lxc_path = lxc_path

    @cached_property
    def lxc_path(self) -> Path:
        if self._lxc_path is not None:
            return self._lxc_path
        out = self.tool.output(["lxc-config", "lxc.lxcpath"])
        return Path(out.stdout.strip() or "/var/lib/lxc")

    def installed(self) -> str | None:
        if shutil.which("lxc-checkpoint") is None:
            return f"lxc-checkpoint is not installed; {INSTALL}"
        return None

    def config_path(self, container: str) -> Path:
        return self.lxc_path / container / "config"

    def pid(self, container: str) -> int | None:
        out = self.tool.output(["lxc-info", "-P", str(self.lxc_path), "-n", container, "-p", "-H"])
        text = out.stdout.strip()
        return int(text) if out.returncode == 0 and text.isdigit() else None

    def problems(self, container: str) -> list[Problem]:
        missing = self.installed()
        if missing:
            return [Problem("LXC is missing", missing)]
        path = self.config_path(container)
        if not path.is_file():
            return [
                Problem(
                    f"no LXC container {container} (no {path})",
                    "check the name with `lxc-ls`",
                )
            ]
        return lxc_config.problems(lxc_config.read(path))

    def _rootfs(self, container: str) -> Path:
        path = self.config_path(container)
        found = lxc_config.rootfs_path(lxc_config.read(path)) if path.is_file() else None
        if found is None and path.is_file():
            raise ContainerError(
                f"container {container}: its lxc.rootfs.path is not a folder; only `dir:` "
                "rootfs are checkpointed",
                CriuFailure.CONFIG,
            )
        return found or self.lxc_path / container / "rootfs"

    def checkpoint(self, container: str, images: Path, opts: DumpOptions) -> DumpStats:
        config = self.config_path(container)
        rootfs = self._rootfs(container)
        argv = ["lxc-checkpoint", "-P", str(self.lxc_path), "-n", container, "-D", str(images)]
        self.tool.run(argv, container, "dump", criu_logs=[images / "dump.log"])
        (images / "dump.log").unlink(missing_ok=True)
        shutil.copyfile(config, images / CONFIG)
        rootfs_archive.write(rootfs, images / ROOTFS)
        return read_dump_stats(images)

    def restore(self, container: str, images: Path, opts: DumpOptions) -> tuple[int, RestoreStats]:
        if self.pid(container) is not None:
            raise ContainerError(
                f"container {container} is running; stop it first (`lxc-stop -k -n {container}`)",
                CriuFailure.RUNNING,
            )
        for name in (CONFIG, ROOTFS):
            if not (images / name).is_file():
                raise ContainerError(
                    f"checkpoint of container {container} lacks its {name}",
                    CriuFailure.CORRUPT_IMAGE,
                )
        rootfs = self._rootfs(container)
        text = (images / CONFIG).read_text(errors="replace")
        added = lxc_config.added_host_access(
            text, lxc_config.read_granted(self.config_path(container))
        )
        if added:
            ln = added[0]
            raise ContainerError(
                f"the checkpoint's config of container {container} has `{ln.key} = {ln.value}` "
                f"({ln.where}), which this host's {self.config_path(container)} does not: a "
                "restore runs no hook and mounts no host path that the host's own config does "
                "not grant; add the line there if it is meant, then restore again",
                CriuFailure.CONFIG,
            )
        self._write_config(container, text, rootfs)
        self._replace_rootfs(images / ROOTFS, rootfs)
        argv = ["lxc-checkpoint", "-r", "-P", str(self.lxc_path), "-n", container]
        try:
            self.tool.run(
                [*argv, "-D", str(images)], container, "restore", [images / "restore.log"]
            )
        finally:
            (images / "restore.log").unlink(missing_ok=True)
        # CRIU restores the freezer state the container had at its dump: a migration's final
        # checkpoint comes back frozen (seen on these hosts: every task in D state, while
        # lxc-info says RUNNING and lxc-unfreeze does nothing) unless its cgroup is thawed.
        self.thaw(container)
        pid = self.pid(container)
        if pid is None:
            raise ContainerError(
                f"container {container} exited right after its restore; see `lxc-info -n "
                f"{container}` and its log",
                CriuFailure.UNKNOWN,
            )
        return pid, read_restore_stats(images)

    def stop(self, container: str) -> None:
        self.tool.output(["lxc-stop", "-P", str(self.lxc_path), "-k", "-n", container])

    def freeze(self, container: str) -> bool:
        # Tried on these hosts: lxc-checkpoint dumps a frozen container and leaves it frozen,
        # lxc-stop -k kills it frozen, and its images restore running.
        out = self.tool.output(["lxc-freeze", "-P", str(self.lxc_path), "-n", container])
        return out.returncode == 0

    def thaw(self, container: str) -> None:
        self.tool.output(["lxc-unfreeze", "-P", str(self.lxc_path), "-n", container])
        pid = self.pid(container)
        if pid is not None:
            thaw_cgroup(pid)

    def _write_config(self, container: str, text: str, rootfs: Path) -> None:
        folder = self.lxc_path / container
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = folder / f".config.{os.getpid()}"
        tmp.write_text(lxc_config.with_rootfs(text, rootfs))
        os.replace(tmp, folder / "config")

    def _replace_rootfs(self, archive: Path, rootfs: Path) -> None:
        """The checkpoint's rootfs in place of this host's (if any), swapped in by rename: a
        failed extraction leaves the old one as it was."""
        rootfs.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        new = rootfs.with_name(f".{rootfs.name}.restoring")
        old = rootfs.with_name(f".{rootfs.name}.replaced")
        for leftover in (new, old):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
        new.mkdir(mode=0o755)
        try:
            rootfs_extract.extract(archive, new)
        except (rootfs_extract.UnsafeArchive, OSError) as e:
            shutil.rmtree(new, ignore_errors=True)
            raise ContainerError(
                f"cannot unpack the container's rootfs: {e}", CriuFailure.CORRUPT_IMAGE
            ) from e
        if rootfs.is_dir() and not rootfs.is_symlink():
            os.rename(rootfs, old)
        os.rename(new, rootfs)
        shutil.rmtree(old, ignore_errors=True)


def thaw_cgroup(pid: int) -> None:
    """Thaw the freezer cgroup(s) of `pid` through the cgroup files themselves: the cgroup v1
    freezer, and `cgroup.freeze` of its v2 cgroup (in the hybrid layout of these hosts, under
    /sys/fs/cgroup/unified). The paths come from the kernel (/proc/PID/cgroup)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "freezer" in controllers.split(","):
            targets = [(Path("/sys/fs/cgroup/freezer") / rel / "freezer.state", "THAWED")]
        elif controllers == "":
            bases = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
            targets = [(base / rel / "cgroup.freeze", "0") for base in bases]
        else:
            continue
        for target, value in targets:
            if ".." not in Path(rel).parts and target.is_file():
                target.write_text(value)
                break
