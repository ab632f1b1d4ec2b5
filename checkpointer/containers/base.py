"""What a container runtime does for the engine, and how its tools are run.

A container workload is checkpointed and restored by its runtime's own tools (`lxc-checkpoint`,
`podman container checkpoint`), which run CRIU with the namespaces, mounts and cgroups the
runtime set up: the service never second-guesses them. What the engine needs of a runtime is
small: the container's init PID (to watch it die), a checkpoint into a folder of flat files the
repository stores deduplicated, a restore from such a folder, a stop, and the problems that
would make a checkpoint fail, found before the first one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from checkpointer.criu import CriuError, DumpOptions, DumpStats, RestoreStats
from checkpointer.criu.failures import CriuFailure, classify
from checkpointer.host import children

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_container_name(name: str) -> str:
    """A container name as both runtimes accept it, and safe as one path component (LXC
    keeps a container in LXC_PATH/NAME)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ContainerError(
            f"invalid container name {name!r}: use letters, digits, '_', '.' and '-' "
            "(first a letter or digit, at most 128)",
            CriuFailure.BAD_NAME,
        )
    return name


class ContainerError(CriuError):
    """A runtime's checkpoint or restore failed; `category` as for CRIU's own failures."""

    kind = "container"


@dataclass(frozen=True)
class Problem:
    """Something in a container's set-up that makes its checkpoint or restore fail."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}; {self.fix}"


class ContainerRuntime(Protocol):
    """One runtime (LXC, Podman). Every method names the container as its runtime does."""

    kind: str

    def installed(self) -> str | None:
        """None if the runtime's tools are here and usable; else what to install."""
        ...

    def pid(self, container: str) -> int | None:
        """The container's init as a host PID, or None when it is not running."""
        ...

    def problems(self, container: str) -> list[Problem]:
        """What would make a checkpoint or a restore of `container` fail (empty: none known)."""
        ...

    def checkpoint(self, container: str, images: Path, opts: DumpOptions) -> DumpStats:
        """Checkpoint into `images` (flat files only); the container keeps running."""
        ...

    def restore(self, container: str, images: Path, opts: DumpOptions) -> tuple[int, RestoreStats]:
        """Bring the container back from `images` (it must not be running); its init's PID."""
        ...

    def stop(self, container: str) -> None:
        """Kill the container now (a rollback, an unregister that stops it); works on a
        frozen container too."""
        ...

    def freeze(self, container: str) -> bool:
        """Stop every process of the container (cgroup freezer) until `thaw`: a checkpoint of
        a frozen container works and leaves it frozen, so that nothing it does after the dump
        is lost (a migration's final checkpoint). False when this runtime cannot."""
        ...

    def thaw(self, container: str) -> None:
        """Let a frozen container run again (a migration whose hand-over failed)."""
        ...


def _which(program: str) -> str:
    exe = shutil.which(program)
    if exe is None:
        raise ContainerError(
            f"{program} is not installed; run `make containers` (or apt-get install it)",
            CriuFailure.RUNTIME_MISSING,
        )
    return exe


@dataclass(frozen=True)
class Tool:
    """Runs a runtime's command-line tool with its output in a log file, never a pipe.

    `lxc-checkpoint -r` leaves the restored container holding the caller's stdout and stderr:
    a caller reading them through a pipe waits until the container exits. A file has no such
    reader, and it is the log kept when the run fails.
    """

    failed_logs_dir: Path
    timeout: float = 600.0

    def run(self, argv: Sequence[str], label: str, op: str, criu_logs: Sequence[Path] = ()) -> str:
        """Run; its output on success. A failure raises, classified on the tool's output and
        the CRIU logs it left (`criu_logs`), all of them kept in one log file."""
        exe = _which(argv[0])
        self.failed_logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        log = self.failed_logs_dir / f"{label}-{stamp}-{os.getpid()}-{op}.log"
        with open(log, "w+", opener=lambda p, f: os.open(p, f, 0o600)) as out:
            try:
                done = children.run(
                    [exe, *argv[1:]],
                    timeout=self.timeout,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            except subprocess.TimeoutExpired as e:
                raise ContainerError(
                    f"{argv[0]} {op} of {label} took longer than {self.timeout:.0f}s and was "
                    "killed",
                    CriuFailure.TIMEOUT,
                    log,
                ) from e
            if done.returncode != 0:
                for extra in criu_logs:
                    if extra.is_file():
                        out.write(f"\n--- {extra.name} ---\n")
                        out.write(extra.read_text(errors="replace"))
            out.seek(0)
            text = out.read()
        if done.returncode == 0:
            log.unlink(missing_ok=True)
            return text
        raise failure(f"{argv[0]} {op} of {label} failed", text, log)

    def output(
        self, argv: Sequence[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """A short query (state, PID): its output captured; the caller reads the status."""
        exe = _which(argv[0])
        return children.run(
            [exe, *argv[1:]], timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True
        )


# Runtime messages that name their own fix, checked before CRIU's log is classified.
_RUNTIME_CAUSES: list[tuple[str, CriuFailure, str]] = [
    (
        "tty: Unable to find a master",
        CriuFailure.TTY,
        "the container has terminals CRIU cannot restore: set `lxc.tty.max = 0` in its config",
    ),
    (
        "console.path configured on source host but not target",
        CriuFailure.TTY,
        "the container has a console CRIU cannot restore: set `lxc.pty.max = 1` (or less) in "
        "its config",
    ),
    (
        "apparmor LSM specified but apparmor not supported",
        CriuFailure.APPARMOR,
        "this kernel has no AppArmor: remove the `lxc.apparmor.profile` line of the config",
    ),
    (
        "image not known",
        CriuFailure.IMAGE_MISSING,
        "the container's base image is not on this host: copy it here (`podman save` there, "
        "`podman load` here) and restore again",
    ),
    (
        "configured runtime does not support checkpoint/restore",
        CriuFailure.RUNTIME,
        "crun here has no CRIU support: recreate the container with `--runtime runc`",
    ),
]


def failure(what: str, text: str, log: Path | None) -> ContainerError:
    """One line with the cause and its fix; the full output stays in `log`."""
    pulled = re.search(r"Trying to pull (\S+?)\.\.\.", text)
    if pulled and "Error" in text[pulled.end() :]:
        image = pulled.group(1)
        return ContainerError(
            f"{what}: the container's base image {image} is not on this host and could not "
            f"be pulled; copy it here (`podman save -o F {image}` where it is, `podman load "
            "-i F` here) and restore again",
            CriuFailure.IMAGE_MISSING,
            log,
        )
    for needle, category, advice in _RUNTIME_CAUSES:
        if needle in text:
            return ContainerError(f"{what}: {needle}; {advice}", category, log)
    category, first, advice = classify(text)
    if category == CriuFailure.UNKNOWN:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "no output")
        advice = "read the log for the cause"
    return ContainerError(f"{what}: {first}; {advice}", category, log)


def copy_range(src: int, dst: int, offset: int, size: int) -> int:
    """Copy `size` bytes of `src` from `offset` to `dst` at its position, in the kernel (a
    300 MB Podman export took 1.6 s through tarfile's Python copy): copy_file_range, or
    sendfile where the two files are on different filesystems (EXDEV: a rootfs on disk, the
    image folder on /dev/shm). Returns the bytes copied, less than `size` only if `src` ended."""
    done = 0
    kernel_copy = True
    while done < size:
        try:
            if kernel_copy:
                n = os.copy_file_range(src, dst, size - done, offset + done)
            else:
                n = os.sendfile(dst, src, offset + done, size - done)
        except OSError as e:
            if kernel_copy and e.errno in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
            ):
                kernel_copy = False
                continue
            raise
        if n == 0:
            break
        done += n
    return done
