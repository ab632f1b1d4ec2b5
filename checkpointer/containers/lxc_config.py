"""An LXC container's config file: the lines that stop a checkpoint or a restore, and the
rootfs path a restore on another host must point at its own copy.

Every rule here was seen failing on these hosts (LXC 5.0.2, CRIU 4.2.1, kernel 6.18); each
problem names the line and the change that fixes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from checkpointer.containers.base import Problem

_INCLUDE_DEPTH = 4


@dataclass(frozen=True)
class Line:
    key: str
    value: str
    where: str  # "FILE:LINE", for the operator


def parse(text: str, where: str) -> list[Line]:
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#") or "=" not in s:
            continue
        key, _, value = s.partition("=")
        lines.append(Line(key.strip(), value.strip(), f"{where}:{n}"))
    return lines


def read(path: Path, depth: int = 0) -> list[Line]:
    """The config's lines with its `lxc.include` files in place (the templates' common.conf
    is where an AppArmor profile usually comes from)."""
    lines = []
    for line in parse(path.read_text(errors="replace"), str(path)):
        if line.key == "lxc.include" and depth < _INCLUDE_DEPTH:
            inc = Path(line.value)
            files = sorted(inc.glob("*.conf")) if inc.is_dir() else [inc] if inc.is_file() else []
            for f in files:
                lines += read(f, depth + 1)
        else:
            lines.append(line)
    return lines


def values(lines: list[Line], key: str) -> list[Line]:
    return [ln for ln in lines if ln.key == key]


def rootfs_path(lines: list[Line]) -> Path | None:
    """The rootfs folder (`dir:` backend or a plain path); None for other backends."""
    found = values(lines, "lxc.rootfs.path")
    if not found:
        return None
    value = found[-1].value
    if value.startswith("dir:"):
        value = value[4:]
    if ":" in value or not value.startswith("/"):
        return None
    return Path(value)


def _apparmor_enabled() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


def problems(lines: list[Line]) -> list[Problem]:
    found: list[Problem] = []
    for ln in values(lines, "lxc.tty.max"):
        if ln.value.isdigit() and int(ln.value) > 0:
            found.append(
                Problem(
                    f"{ln.where}: `lxc.tty.max = {ln.value}`: CRIU cannot restore a container's "
                    "ttys (`tty: Unable to find a master`)",
                    "set `lxc.tty.max = 0`",
                )
            )
    for ln in values(lines, "lxc.pty.max"):
        if ln.value.isdigit() and int(ln.value) >= 2:
            found.append(
                Problem(
                    f"{ln.where}: `lxc.pty.max = {ln.value}`: the restore fails with "
                    "`lxc.console.path configured on source host but not target`",
                    "set `lxc.pty.max = 1`",
                )
            )
    if not _apparmor_enabled():
        for ln in values(lines, "lxc.apparmor.profile"):
            found.append(
                Problem(
                    f"{ln.where}: `lxc.apparmor.profile = {ln.value}`: this kernel has no "
                    "AppArmor and CRIU refuses an image that names a profile",
                    "remove the line",
                )
            )
    for ln in values(lines, "lxc.mount.entry"):
        source = ln.value.split()[0] if ln.value.split() else ""
        if source.startswith("/") and os.path.islink(source):
            found.append(
                Problem(
                    f"{ln.where}: `lxc.mount.entry` source {source} is a symlink: CRIU "
                    "restores the mount from its real path and fails",
                    f"use the real path ({os.path.realpath(source)})",
                )
            )
    for ln in values(lines, "lxc.init.cmd"):
        init = ln.value.split()[0] if ln.value.split() else ""
        if Path(init).name in ("systemd", "init"):
            found.append(
                Problem(
                    f"{ln.where}: `lxc.init.cmd = {ln.value}`: systemd as the container's init "
                    "cannot be checkpointed here (its credentials ramfs mount)",
                    "run the application itself as init (`lxc.init.cmd = /path/to/app ...`)",
                )
            )
    if rootfs_path(lines) is None:
        found.append(
            Problem(
                "the container's `lxc.rootfs.path` is not a `dir:` folder",
                "only folder rootfs are checkpointed (copy it to a folder: `lxc-copy -B dir`)",
            )
        )
    return found


def with_rootfs(text: str, rootfs: Path) -> str:
    """The config text with its rootfs line pointing at `rootfs` (this host's copy)."""
    line = f"lxc.rootfs.path = dir:{rootfs}"
    pattern = re.compile(r"^\s*lxc\.rootfs\.path\s*=.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: line, text)
    return text.rstrip("\n") + "\n" + line + "\n"


# Lines by which a config acts on the host as root rather than inside the container: programs
# LXC runs on the host (hooks, network scripts), host paths it mounts, reads or writes.
_HOST_KEYS = re.compile(
    r"lxc\.hook\..+|lxc\.net\.\d+\.script\..+|lxc\.mount\.fstab|lxc\.mount\.entry|"
    r"lxc\.include|lxc\.console\.(logfile|path)|lxc\.log\.file|lxc\.seccomp\.profile"
)
# LXC's own packaged configs (the templates include common.conf from here): root's files on
# this host, with their hooks and mounts, not the checkpoint's.
PACKAGED = Path("/usr/share/lxc/config")


def _host_access(line: Line) -> bool:
    if not _HOST_KEYS.fullmatch(line.key):
        return False
    if line.key == "lxc.mount.entry":
        fields = line.value.split()
        source = fields[0] if fields else ""
        options = fields[3].split(",") if len(fields) > 3 else []
        # proc, sysfs, tmpfs...: a kernel filesystem, not a host path; a bind mount is the host's
        return source.startswith("/") or "bind" in options or "rbind" in options
    if line.key == "lxc.include":
        return not Path(os.path.normpath(line.value)).is_relative_to(PACKAGED)
    return True


def added_host_access(restored: str, host: list[Line]) -> list[Line]:
    """The lines of a checkpoint's config (`restored`) that would run a program on the host
    or reach a host path, and that the host's own config for the container (`host`, read with
    its includes; [] when it has none) does not have word for word. A checkpoint's config is
    the container's as it was, but whoever can write the repository in clear could have put a
    hook there that a restore would run as root: only what this host's config grants already
    may come back."""
    granted = {(ln.key, " ".join(ln.value.split())) for ln in host}
    return [
        ln
        for ln in parse(restored, "the checkpoint's lxc.config")
        if _host_access(ln) and (ln.key, " ".join(ln.value.split())) not in granted
    ]


def read_granted(path: Path) -> list[Line]:
    """The host's own config lines, its include lines as well as what they include."""
    if not path.is_file():
        return []
    return parse(path.read_text(errors="replace"), str(path)) + read(path)
