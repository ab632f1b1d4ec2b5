"""What a Podman checkpoint may ask of the host that restores it.

`podman container restore --import` creates the container from the checkpoint's
`config.dump` (Podman's container config, with a spec of its own) and runs it with
`spec.dump` (the OCI spec runc got). Both can name OCI hooks (programs run as root on the
host), bind mounts of host paths, host devices, a privileged container and host paths Podman
writes to (its log, pid files) or unmounts at cleanup. A repository in clear authenticates
none of it, so a restore grants only what this host's own definition of the container already
has (its OCI spec, `podman inspect`), plus the files Podman keeps for the container itself
(`<graphRoot|runRoot>/overlay-containers/<ID>/userdata`: /etc/hosts, resolv.conf, /dev/shm...).
A host that knows no such container grants no hook, host mount or device at all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Filesystems that show no host file to the container: their `source` is only a label.
PSEUDO_FS = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm"})
# config.dump's host paths Podman writes (log, pid files) or removes, keyed to the
# `podman inspect` field that shows this host's value.
HOST_PATH_FIELDS = {
    "logPath": "LogPath",
    "conmonPidFile": "ConmonPidFile",
    "pid_file": "PidFile",
    "staticDir": "StaticDir",
    "ShmDir": "ShmDir",
    "secretsPath": "",
}
# config.dump's flags that open the host's devices and /sys to the container.
HOST_FLAGS = {"privileged": "Privileged", "mountAllDevices": ""}
VOLUME_FIELDS = ("namedVolumes", "overlayVolumes", "imageVolumes", "artifactVolumes")
_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Known:
    """What this host knows of the container: its OCI spec (None: no such container, or
    never started), its `podman inspect` record, and Podman's storage roots here."""

    spec: dict[str, Any] | None
    inspect: dict[str, Any] | None
    storage_roots: tuple[str, ...] = ("/var/lib/containers/storage", "/run/containers/storage")


class Refused(ValueError):
    """The checkpoint asks for something this host does not grant; the message names it."""


def _json(text: str, what: str) -> dict[str, Any]:
    try:
        found = json.loads(text)
    except ValueError as e:
        raise Refused(f"{what} is not JSON ({e})") from e
    if not isinstance(found, dict):
        raise Refused(f"{what} is not a JSON object")
    return found


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _canon(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True)


def hooks(spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for phase, entries in _dict(spec.get("hooks")).items():
        for hook in _list(entries) if isinstance(entries, list) else [entries]:
            yield str(phase), hook


def host_mount(mount: Any) -> bool:
    """A mount that shows the container a host path: a bind, or any filesystem that is
    not a pseudo one (a block device, devtmpfs, overlay of host folders...)."""
    m = _dict(mount)
    options = [str(o) for o in _list(m.get("options"))]
    return m.get("type") not in PSEUDO_FS or "bind" in options or "rbind" in options


def devices(spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    linux = _dict(spec.get("linux"))
    for dev in _list(linux.get("devices")):
        yield "linux.devices", dev
    for rule in _list(_dict(linux.get("resources")).get("devices")):
        if _dict(rule).get("allow"):
            yield "linux.resources.devices", rule


def own_dirs(cid: str, known: Known) -> list[str]:
    """Where Podman keeps the container's own files (bind-mounted as /etc/hosts, /dev/shm...)."""
    return [os.path.join(r, "overlay-containers", cid, "userdata") for r in known.storage_roots]


def _own(path: Any, dirs: list[str]) -> bool:
    if not isinstance(path, str) or not path.startswith("/") or os.path.normpath(path) != path:
        return False
    return any(path == d or path.startswith(d + "/") for d in dirs)


def refusals(config_text: str, spec_text: str, known: Known) -> list[str]:
    """Each entry of the checkpoint's config.dump / spec.dump that this host does not grant,
    as a line naming it (empty: the restore may go ahead)."""
    config = _json(config_text, "config.dump")
    spec = _json(spec_text, "spec.dump")
    cid = config.get("id")
    if not isinstance(cid, str) or not _ID.fullmatch(cid):
        return [f"config.dump: container id {cid!r} is not 64 hex digits"]
    dirs = own_dirs(cid, known)
    local = known.spec or {}
    info = known.inspect or {}
    granted_hooks = {(p, _canon(h)) for p, h in hooks(local)}
    granted_mounts = {_canon(m) for m in _list(local.get("mounts")) if host_mount(m)}
    granted_devices = {(k, _canon(d)) for k, d in devices(local)}
    found: list[str] = []
    specs = (("spec.dump", spec), ("config.dump spec", _dict(config.get("spec"))))
    for where, s in specs:
        for phase, hook in hooks(s):
            if (phase, _canon(hook)) not in granted_hooks:
                found.append(f"{where}: OCI hook {phase} {_canon(hook)}")
        for mount in _list(s.get("mounts")):
            m = _dict(mount)
            own = _own(m.get("source"), dirs)
            if host_mount(m) and not own and _canon(mount) not in granted_mounts:
                found.append(f"{where}: host mount {_canon(mount)}")
        for key, dev in devices(s):
            if (key, _canon(dev)) not in granted_devices:
                found.append(f"{where}: device {key} {_canon(dev)}")
    host_config = _dict(info.get("HostConfig"))
    for name, local_name in HOST_FLAGS.items():
        if config.get(name) and not (local_name and host_config.get(local_name)):
            found.append(f"config.dump: {name} = true")
    for name, local_name in HOST_PATH_FIELDS.items():
        value = config.get(name)
        if value in (None, "") or _own(value, dirs):
            continue
        if local_name and value == info.get(local_name):
            continue
        found.append(f"config.dump: {name} = {value!r}")
    for value in _list(config.get("mounts")):
        if not _own(value, dirs):
            found.append(f"config.dump: mounts entry {value!r}")
    for name in VOLUME_FIELDS:
        if _list(config.get(name)):
            found.append(f"config.dump: {name} {_canon(config.get(name))}")
    return found


def local_spec(inspect: dict[str, Any] | None) -> dict[str, Any] | None:
    """This host's OCI spec of the container (`OCIConfigPath`, written when it was created
    or started), or None."""
    path = (inspect or {}).get("OCIConfigPath")
    if not isinstance(path, str) or not path:
        return None
    try:
        return _json(Path(path).read_text(), path)
    except (OSError, Refused):
        return None
