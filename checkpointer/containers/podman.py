"""Podman containers (runtime runc), through `podman container checkpoint --export` and
`podman container restore --import`.

The export is a tar of CRIU's images (`checkpoint/`) and Podman's own files (`config.dump`,
`spec.dump`, `network.status`, `rootfs-diff.tar`, ...). Inside a tar, files sit on 512-byte
boundaries, so the tar itself would defeat the repository's 4 KiB page dedup: the folder stored
is the export unpacked, CRIU's images as they are and Podman's files prefixed with
`podman.`; a restore packs them into a tar again. The export holds the rootfs changes against
the base image, not the image itself: a host restoring it needs the base image.

Podman's rootfs diff lacks ACLs and `trusted.*` attributes: they are added at checkpoint, and
the tars Podman unpacks as root on restore (and its list of files to delete) are checked
first, against the base image where a name goes below a folder the diff does not make
(podman_rootfs.py says why and how).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkpointer.containers import cgroup_freezer
from checkpointer.containers import podman_config_check as config_check
from checkpointer.containers import podman_export as export_tar
from checkpointer.containers.base import ContainerError, Problem, Tool
from checkpointer.containers.podman_export import PREFIX
from checkpointer.criu import DumpOptions, DumpStats, RestoreStats
from checkpointer.criu.failures import CriuFailure
from checkpointer.criu.images.stats import read_dump_stats

INSTALL = "install Podman and runc (`apt-get install podman runc`, or `make containers`)"

_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
log = logging.getLogger(__name__)


class Podman:
    kind = "podman"

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self._roots: tuple[str, ...] | None = None

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
        return _running_pid(self.inspect(container))

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
            export_tar.unpack(export, images, lambda: self._open_rootfs(container))
        finally:
            export.unlink(missing_ok=True)
        self._storage_roots()  # asked now, not during the first restore
        return read_dump_stats(images)

    def _open_rootfs(self, container: str) -> int:
        """A descriptor of the container's merged rootfs (the host's view of its files,
        without its own mounts), where the attributes its export lacks are read; -1 (with a
        warning: the restore will lack its ACLs and `trusted.` attributes) if there is none."""
        data = ((self.inspect(container) or {}).get("GraphDriver") or {}).get("Data") or {}
        merged = data.get("MergedDir") if isinstance(data, dict) else None
        if isinstance(merged, str) and os.path.isabs(merged):
            try:
                return os.open(merged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                merged = f"{merged}: {e.strerror}"
        log.warning(
            "container %s: no merged rootfs to read its ACLs and trusted. attributes from "
            "(%s); its checkpoint keeps only what Podman's export has",
            container,
            merged,
        )
        return -1

    def restore(self, container: str, images: Path, opts: DumpOptions) -> tuple[int, RestoreStats]:
        """What Podman does not need to wait for is not waited for: the tar is streamed to
        its import through a FIFO as it reads it (no copy of the image first), the dead
        container is removed and the base image unmounted while the import starts."""
        info = self.inspect(container)
        if _running_pid(info) is not None:
            raise ContainerError(
                f"container {container} is running; stop it first (`podman kill {container}`)",
                CriuFailure.RUNNING,
            )
        self._check_config(container, images, info)
        fifo = images.parent / f"{images.name}.import.tar"
        fifo.unlink(missing_ok=True)  # left by a daemon killed during a restore
        base = _ImageRoot(self.tool, container, _images_of(images))
        try:
            tar = export_tar.packed(images, images.parent, base)
        except BaseException:
            base.close()
            raise
        unmount = _Background(base.close)  # the checks are done with it
        # The dead container's name must be free: the import creates it anew, rootfs
        # changes included, from the base image (only once every check above passed).
        remove = _Background(
            (lambda: self.tool.run(["podman", "rm", "--force", "--time", "0", container],
                                   container, "rm"))
            if info is not None else (lambda: None)
        )  # fmt: skip
        argv = ["podman", "container", "restore", "--import", str(fifo)]
        if opts.tcp_established:
            argv.append("--tcp-established")
        if opts.file_locks:
            argv.append("--file-locks")
        try:
            with tar, export_tar.served(tar, fifo, remove.ok):
                self.tool.run(argv, container, "restore")
        except ContainerError:
            remove.ok()
            if remove.error is not None:  # the cause of the import's failure
                raise remove.error from None
            raise
        finally:
            remove.ok()
            unmount.ok()
        # CRIU restores the freezer state of the dump: a migration's final checkpoint may
        # come back frozen (runc thawed it in every run here; LXC's did not), so thaw it.
        pid = self.pid(container)
        if pid is None:
            raise ContainerError(
                f"container {container} is not running after its restore; see `podman logs "
                f"{container}`",
                CriuFailure.UNKNOWN,
            )
        cgroup_freezer.thaw(pid)
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
                CriuFailure.CONFIG,
            )

    def _storage_roots(self) -> tuple[str, ...]:
        """Podman's graphRoot and runRoot here: the container's own files live under them.
        Asked once (`podman info` took 1.2 s, most of a restore's own time): they change
        only with Podman's storage configuration, and a `podman system reset` that removes
        every container goes with that."""
        if self._roots is None:
            out = self.tool.output(["podman", "info", "--format", "json"])
            try:
                store = json.loads(out.stdout).get("store") or {}
                roots = tuple(str(store[k]) for k in ("graphRoot", "runRoot") if store.get(k))
            except (ValueError, AttributeError):
                roots = ()
            if out.returncode != 0 or not roots:
                return config_check.Known(None, None).storage_roots  # asked again next time
            self._roots = roots
        return self._roots

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


class _ImageRoot:
    """`podman image mount` of the first of `names` this host has, on the first call; the
    last (the image's name) pulled first if none is here, as the import itself would. It
    opens the root of the image the import creates the container from (what the rootfs diff
    is unpacked over, and checked against), called only if the check needs it (a diff whose
    members all lie below its own folders does not): 0.1-0.2 s a restore here. It gives -1
    if the checkpoint names no image (a container made from a rootfs folder)."""

    def __init__(self, tool: Tool, container: str, names: list[str]) -> None:
        self.tool, self.container, self.names = tool, container, names
        self.fd: int | None = None
        self.mounted = ""

    def __call__(self) -> int:
        if self.fd is None:
            self.fd = -1
            if self.names and not self._mount():
                image = self.names[-1]
                pulled = self.tool.output(["podman", "pull", "-q", image], timeout=600)
                if pulled.returncode != 0 or not self._mount():
                    raise ContainerError(
                        f"podman restore of {self.container}: the container's base image "
                        f"{image} is not on this host and could not be pulled; copy it here "
                        f"(`podman save -o F {image}` where it is, `podman load -i F` here) "
                        "and restore again",
                        CriuFailure.IMAGE_MISSING,
                    )
        return self.fd

    def _mount(self) -> bool:
        for image in self.names:
            out = self.tool.output(["podman", "image", "mount", image])
            if out.returncode == 0:
                self.mounted = image
                path = out.stdout.strip()
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                return True
        return False

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        if self.mounted:
            self.tool.output(["podman", "image", "unmount", self.mounted])
        self.fd, self.mounted = None, ""


def _images_of(images: Path) -> list[str]:
    """The base image config.dump names: its ID, then its name (the import pulls the name if
    this host lacks it, then creates the container from the image of that ID)."""
    try:
        config = json.loads((images / f"{PREFIX}config.dump").read_text(errors="replace"))
    except (OSError, ValueError):
        return []  # refused by _check_config before this is asked
    found = []
    for key, form in (("rootfsImageID", _IMAGE_ID), ("rootfsImageName", _IMAGE_NAME)):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, str) and form.fullmatch(value):
            found.append(value)
    return found


def _running_pid(info: dict[str, Any] | None) -> int | None:
    state = (info or {}).get("State") or {}
    pid = state.get("Pid")
    return pid if state.get("Running") and isinstance(pid, int) and pid > 0 else None


class _Background:
    """`fn()` in a thread of its own, while the restore goes on."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # the caller's to raise
            self.error = e

    def ok(self) -> bool:
        """Whether it succeeded, once it is done."""
        self.thread.join()
        return self.error is None
