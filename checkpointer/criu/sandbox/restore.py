"""Restore a checkpoint where it cannot touch anything live: a restore drill's CRIU run.

A drill proves a checkpoint before it is needed: CRIU restores every process, file and socket
of it, or says why not (a file that changed size, a socket it cannot re-create). It runs in a
sandbox (init.py, PID 1 of new PID, mount, network, IPC and UTS namespaces) whose file
systems are copy-on-write views of the host's, so that nothing CRIU does while restoring
reaches the live tree's files; the tree is left stopped (`--leave-stopped`: the restored code
never runs) and is killed with the sandbox. Cgroups are left alone (`--manage-cgroups=ignore`):
restored into the live tree's cgroups, the copy would count against its memory and PID limits.

Managed and adopted trees alike: the sandbox's PID namespace is fresh, so an adopted tree's
PIDs, which its live tree holds on the host, are free there.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpointer.criu.driver import Criu, restore_argv
from checkpointer.criu.failures import CriuError, CriuFailure, classify
from checkpointer.criu.images.stats import RestoreStats, read_restore_stats
from checkpointer.criu.options import DumpOptions
from checkpointer.criu.sandbox import priority as sandbox_priority
from checkpointer.host import children

INIT = Path(__file__).with_name("init.py")
NAMESPACES = ("--mount", "--pid", "--net", "--ipc", "--uts")
# Not the checkpoint's fault: the sandbox could not be built, or held too little.
SANDBOX_CATEGORIES = frozenset({CriuFailure.SANDBOX, CriuFailure.NO_SPACE, CriuFailure.NOT_STOPPED})


@dataclass(frozen=True)
class SandboxRestore:
    """A restore that worked: how many processes CRIU brought back (all of them: checked
    against the checkpoint's process tree), CRIU's statistics, and what the sandbox left out."""

    processes: int
    stats: RestoreStats
    seconds: float
    notes: list[str] = field(default_factory=list)


def restore_in_sandbox(
    criu: Criu,
    images: Path,
    opts: DumpOptions,
    label: str,
    inherit: Sequence[tuple[int, str]] = (),
    cgroups: Sequence[str] = (),
) -> SandboxRestore:
    """Restore the image in `images` in a sandbox, check it, and kill it. Its work files go
    in `images`' parent folder (the caller's, removed by the caller); its PID 1 first joins
    the cgroups whose `cgroup.procs` files `cgroups` names (cgroup.py). Raises CriuError: a
    category in SANDBOX_CATEGORIES when the sandbox failed, else classified from CRIU's log
    like any restore (restoring.is_transient tells the host's faults from the checkpoint's)."""
    work = images.parent
    (work / "mnt").mkdir(mode=0o700)
    log, stats = work / "criu-sandbox.log", images / "stats-restore"
    expected = count_processes(images)
    argv = restore_argv(criu.exe(), images, work / "sandbox.pid", log, opts, inherit)
    argv += ["--leave-stopped", "--manage-cgroups=ignore"]
    request = {
        "work": str(work),
        "criu": argv,
        "log": str(log),
        "stats": str(stats),
        "fds": [fd for fd, _ in inherit],
        "cgroups": list(cgroups),
    }
    # setpriv: unshare gets SIGKILL if the daemon dies (and `--kill-child` passes it on to
    # the sandbox's PID 1, which takes the whole sandbox with it); then the lowest CPU and
    # I/O priority (sandbox_priority.py): CRIU's work in the sandbox runs only on what the
    # live workloads leave.
    cmd = ["setpriv", "--pdeathsig", "KILL", *sandbox_priority.argv()]
    cmd += ["unshare", *NAMESPACES, "--fork", "--propagation", "private", "--kill-child"]
    cmd += [sys.executable, "-I", str(INIT), json.dumps(request)]
    t0 = time.monotonic()
    try:
        out = children.run(
            cmd,
            timeout=criu.timeout,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            pass_fds=tuple(fd for fd, _ in inherit),
        )
    except subprocess.TimeoutExpired as e:
        raise CriuError(
            f"the restore drill of {label} took longer than {criu.timeout:.0f}s and was "
            "killed with its sandbox; raise criu.timeout if the tree is that large",
            CriuFailure.TIMEOUT,
            criu.keep_log(work / "restore.log", label, "drill"),
        ) from e
    seconds = time.monotonic() - t0
    result = _result(work, out)
    if result.get("criu_exit") != 0:
        _failed(criu, work, label, result)
    seen, stopped = int(result.get("processes", 0)), int(result.get("stopped", 0))
    if stopped != seen:
        raise CriuError(
            f"the restore drill of {label}: {seen - stopped} restored process(es) were not "
            "stopped (CRIU's --leave-stopped); they were killed with the sandbox",
            CriuFailure.NOT_STOPPED,
        )
    if seen != expected:
        raise CriuError(
            f"the restore drill of {label}: CRIU restored {seen} of the checkpoint's "
            f"{expected} processes",
            CriuFailure.INCOMPLETE,
            criu.keep_log(work / "restore.log", label, "drill"),
        )
    try:
        restore_stats = read_restore_stats(work)
    except (OSError, ValueError, struct.error):
        restore_stats = RestoreStats(0.0, 0.0, 0)
    return SandboxRestore(seen, restore_stats, seconds, list(result.get("notes", [])))


def _result(work: Path, out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What init.py wrote back; a CriuError (sandbox) when it wrote nothing usable."""
    try:
        result = json.loads((work / "result.json").read_text())
        if not isinstance(result, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        said = " ".join((out.stderr or out.stdout or "").split())[-400:]
        raise CriuError(
            f"the restore drill's sandbox did not report ({e}; exit status {out.returncode}"
            + (f": {said}" if said else "")
            + "); it needs root, util-linux (setpriv, unshare) and overlayfs",
            CriuFailure.SANDBOX,
        ) from None
    if "error" in result:
        raise CriuError(
            f"the restore drill's sandbox could not be built ({result['error']}, at "
            f"{result.get('stage')}); it needs root, overlayfs and tmpfs",
            CriuFailure.SANDBOX,
        )
    return result


def _failed(criu: Criu, work: Path, label: str, result: dict[str, Any]) -> None:
    log = work / "restore.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    text += "\n" + str(result.get("criu_output", ""))
    category, first, advice = classify(text)
    if category is CriuFailure.UNKNOWN and "No space left on device" in text:
        category, advice = (
            CriuFailure.NO_SPACE,
            "the sandbox's tmpfs is full: the host lacks memory",
        )
    kept = criu.keep_log(log, label, "drill")
    raise CriuError(f"criu restore of {label} (drill) failed: {first}; {advice}", category, kept)


def count_processes(images: Path) -> int:
    """How many processes the checkpoint's process tree (pstree.img) holds: one entry each,
    each a length and a message after the image's two magic numbers."""
    raw = (images / "pstree.img").read_bytes()
    pos, n = 8, 0
    while pos + 4 <= len(raw):
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + size
        n += 1
    return n
