"""A restored Podman checkpoint may add no OCI hook, host mount, device or host path that
this host's own definition of the container lacks (podman_config_check), and Podman.restore
refuses one before it writes or removes anything."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from checkpointer.containers import podman_config_check as check
from checkpointer.containers.base import ContainerError, Tool
from checkpointer.containers.podman import Podman
from checkpointer.criu import DumpOptions
from tests.support.containers import podman, podman_container

CID = "e95f7c4cbbd64e49291cf8c9af20142d4d402f698aee546b99ac4e8170983beb"
RUN = f"/run/containers/storage/overlay-containers/{CID}/userdata"
LIB = f"/var/lib/containers/storage/overlay-containers/{CID}/userdata"
HOOK = {"path": "/bin/sh", "args": ["sh", "-c", "touch /tmp/owned"]}
ETC = {"destination": "/host", "type": "bind", "source": "/etc", "options": ["rbind", "rw"]}


def spec() -> dict[str, Any]:
    """What Podman 4.3 writes for `podman run --runtime runc IMAGE` (spec.dump, trimmed)."""
    return {
        "ociVersion": "1.0.2-dev",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": f"{RUN}/hosts",
                "options": ["bind", "rprivate"],
            },
            {
                "destination": "/dev/shm",
                "type": "bind",
                "source": f"{LIB}/shm",
                "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["ro"],
            },
        ],
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


def config() -> dict[str, Any]:
    return {
        "id": CID,
        "spec": spec(),
        "ShmDir": f"{LIB}/shm",
        "staticDir": LIB,
        "logPath": f"{LIB}/ctr.log",
        "conmonPidFile": f"{RUN}/conmon.pid",
        "pid_file": f"{RUN}/pidfile",
        "secretsPath": f"{LIB}/secrets",
        "mounts": [f"{LIB}/shm"],
        "privileged": False,
    }


def refusals(
    c: dict[str, Any], s: dict[str, Any], local: dict[str, Any] | None = None, **inspect: Any
) -> list[str]:
    known = check.Known(local, inspect or None)
    return check.refusals(json.dumps(c), json.dumps(s), known)


def test_podmans_own_checkpoint_asks_for_nothing_even_where_the_container_is_unknown() -> None:
    assert refusals(config(), spec()) == []


@pytest.mark.parametrize("where", ["spec.dump", "config.dump spec"])
def test_a_hook_is_refused_unless_the_hosts_own_spec_has_it(where: str) -> None:
    c, s = config(), spec()
    target = s if where == "spec.dump" else c["spec"]
    target["hooks"] = {"prestart": [HOOK]}
    found = refusals(c, s)
    assert len(found) == 1 and found[0].startswith(f"{where}: OCI hook prestart")
    assert "touch /tmp/owned" in found[0]
    local = spec()
    local["hooks"] = {"prestart": [HOOK]}
    assert refusals(c, s, local) == []
    local["hooks"] = {"poststop": [HOOK]}  # another phase is another grant
    assert len(refusals(c, s, local)) == 1


def test_a_host_mount_is_refused_unless_granted_exactly() -> None:
    s = spec()
    s["mounts"].append(ETC)
    found = refusals(config(), s)
    assert found == [f"spec.dump: host mount {json.dumps(ETC, sort_keys=True)}"]
    local = spec()
    local["mounts"].append(ETC)
    assert refusals(config(), s, local) == []
    local["mounts"][-1] = {**ETC, "options": ["rbind", "ro"]}  # granted read-only: not rw
    assert len(refusals(config(), s, local)) == 1


@pytest.mark.parametrize(
    "mount",
    [
        {
            "destination": "/x",
            "type": "bind",
            "source": f"{RUN}/../../../../../../etc",
            "options": ["bind"],
        },
        {"destination": "/x", "type": "ext4", "source": "/dev/sda1", "options": []},
        {"destination": "/x", "type": "devtmpfs", "source": "devtmpfs", "options": []},
        {"destination": "/x", "type": "tmpfs", "source": "/etc", "options": ["rbind"]},
        {
            "destination": "/x",
            "type": "bind",
            "source": RUN.replace(CID, "0" * 64),
            "options": ["bind"],
        },
    ],
)
def test_host_paths_dressed_as_podmans_own_or_as_pseudo_filesystems_are_refused(
    mount: dict[str, Any],
) -> None:
    s = spec()
    s["mounts"].append(mount)
    assert len(refusals(config(), s)) == 1


def test_devices_and_device_access_are_refused_unless_the_host_grants_them() -> None:
    s = spec()
    disk = {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}
    s["linux"]["devices"] = [disk]
    s["linux"]["resources"]["devices"].append({"allow": True, "type": "b", "major": 8,
                                               "access": "rwm"})  # fmt: skip
    found = refusals(config(), s)
    assert [f.split(" {")[0] for f in found] == [
        "spec.dump: device linux.devices",
        "spec.dump: device linux.resources.devices",
    ]
    assert refusals(config(), s, copy.deepcopy(s)) == []


def test_config_dump_host_paths_flags_and_volumes_are_refused() -> None:
    for key, value in [
        ("logPath", "/etc/shadow"),
        ("conmonPidFile", "/etc/passwd"),
        ("mounts", ["/"]),
        ("privileged", True),
        ("mountAllDevices", True),
        ("namedVolumes", [{"Name": "data", "Dest": "/data"}]),
        ("id", "../../etc"),
    ]:
        c = config()
        c[key] = value
        found = refusals(c, spec())
        assert len(found) == 1 and key in found[0], (key, found)
    c = config()
    c["logPath"], c["privileged"] = "/var/log/web.log", True
    assert refusals(c, spec(), spec(), LogPath="/var/log/web.log",
                    HostConfig={"Privileged": True}) == []  # fmt: skip


def test_not_json_is_refused() -> None:
    with pytest.raises(check.Refused, match=r"spec\.dump is not JSON"):
        check.refusals(json.dumps(config()), "[", check.Known(None, None))


def test_podman_restore_refuses_a_hook_and_a_host_mount_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """A real checkpoint whose spec.dump gained a hook: Podman.restore refuses it naming the
    hook, before it removes the dead container or packs the import; the hook never runs."""
    name = f"ckt-podcfg-{os.getpid()}"
    canary = tmp_path / "owned"
    runtime = Podman(Tool(tmp_path / "failed"))
    images = tmp_path / "images"
    images.mkdir()
    with podman_container(name, 18099):
        runtime.checkpoint(name, images, DumpOptions())
        dumped = images / "podman.spec.dump"
        s = json.loads(dumped.read_text())
        s["hooks"] = {"createRuntime": [{"path": "/bin/touch", "args": ["touch", str(canary)]}]}
        s["mounts"].append(ETC)
        dumped.write_text(json.dumps(s))
        runtime.stop(name)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(ContainerError) as e:
            runtime.restore(name, images, DumpOptions())
        assert e.value.category == "config"
        assert "OCI hook createRuntime" in str(e.value) and "/bin/touch" in str(e.value)
        assert "(and 1 more)" in str(e.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no import tar
        assert not canary.exists()
        r = podman("container", "inspect", "--format", "{{.State.Status}}", name, check=False)
        assert r.returncode == 0 and r.stdout.strip() == "exited"  # not removed
