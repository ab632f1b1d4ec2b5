"""PID 1 of a restore drill's sandbox: build a copy-on-write view of the host's file systems,
restore the checkpoint there with CRIU (tree left stopped), check what came back, and exit,
which kills everything in the sandbox and drops its mounts.

Run by checkpointer/criu/sandbox/restore.py, always through `unshare --mount --pid --net --ipc --uts
--fork --propagation private --kill-child`, as `python -I init.py REQUEST`, where
REQUEST is JSON: `work` (a folder of the daemon's: `work/mnt` is where the sandbox's tmpfs goes,
`work/result.json`, `work/restore.log` and `work/stats-restore` are where this writes back),
`criu` (the `criu restore` argv), `log`, `stats` (where CRIU writes them, as seen inside),
`fds` (passed on to CRIU) and `cgroups` (the `cgroup.procs` files this process joins first
thing, so that everything the sandbox starts is in its cgroups: cgroup.py).

Why each step:
- The whole tree of mounts the daemon (and so the live workload) sees is rebuilt under a new
  root: every file system an overlay whose upper layer is this sandbox's tmpfs, so that what
  CRIU does while restoring (unlinking and binding a unix socket's path, creating ghost files,
  opening files for writing, taking file locks: on the overlay's inodes) lands in memory and
  never on a live file. devpts is bound as it is (terminals), /proc and /sys are fresh (this
  PID namespace's and this network namespace's); kernel interfaces (cgroup, bpf, tracefs...)
  are left out: the drill restores with --manage-cgroups=ignore.
- A network namespace of its own, loopback up and non-local binds allowed: a listening socket
  comes back on its address even when the live tree holds it, or the address is another
  host's (a checkpoint from elsewhere).
- A PID namespace of its own: the restored tree never competes with the host's PIDs, adopted
  trees included (they keep their PIDs, free in a fresh namespace).
- When this process exits, the kernel kills every process of the PID namespace; the mount and
  network namespaces go with their last process. Nothing is left behind on the host but the
  daemon's own folder, which it removes.

Standard library only, so that it starts fast and imports nothing of the daemon.
"""

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 1

# Kernel interfaces, not files a tree keeps: not rebuilt inside (proc and sysfs are mounted
# fresh, mqueue fresh for the new IPC namespace).
_LEFT_OUT = {
    "proc", "sysfs", "cgroup", "cgroup2", "nsfs", "autofs", "binfmt_misc", "bpf", "tracefs",
    "debugfs", "securityfs", "pstore", "configfs", "fusectl", "efivarfs", "mqueue",
}  # fmt: skip
_BOUND = {"devpts", "hugetlbfs"}  # used as they are: an overlay of them makes no sense

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


class SandboxError(Exception):
    """The sandbox could not be built: the host's fault, never the checkpoint's."""


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [x.encode() if x else None for x in (source, target, fstype)]
    if libc.mount(enc[0], enc[1], enc[2], flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, fs type) of what is visible: the top mount of each mount point (the last
    listed), parents before children (by depth: mountinfo does not list them in that order)."""
    top: dict[str, str] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        top[_unescape(fields[4])] = right.split()[0]
    return sorted(top.items(), key=lambda kv: 0 if kv[0] == "/" else kv[0].count("/"))


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _escape_layer(path: str) -> str:
    """An overlay layer path: its option parser splits at ',' and ':' unless escaped."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def build_root(tmp: str, own: str, notes: list[str]) -> str:
    """Rebuild the visible mounts under `tmp`/root (copy-on-write); `own` (the sandbox's tmpfs)
    is left out. Returns the new root."""
    root = os.path.join(tmp, "root")
    os.mkdir(root, 0o755)
    with open("/proc/self/mountinfo") as f:
        listed = mounts(f.read())
    if not listed or listed[0][0] != "/":
        raise SandboxError("the root file system is not in /proc/self/mountinfo")
    for n, (path, fstype) in enumerate(listed):
        if _under(path, own) or _under(path, "/proc") or _under(path, "/sys"):
            continue
        if fstype in _LEFT_OUT:
            continue
        target = root + path if path != "/" else root
        if not os.path.lexists(target):
            notes.append(f"{path}: its mount point is not visible inside; left out")
            continue
        if fstype in _BOUND or not os.path.isdir(path):
            _read_only_bind(path, target, fstype in _BOUND)
            continue
        layer = os.path.join(tmp, f"l{n}")
        os.mkdir(layer, 0o700)
        os.mkdir(os.path.join(layer, "upper"), 0o755)
        os.mkdir(os.path.join(layer, "work"), 0o700)
        data = (
            f"lowerdir={_escape_layer(path)},upperdir={_escape_layer(layer)}/upper,"
            f"workdir={_escape_layer(layer)}/work"
        )
        try:
            _mount("overlay", target, "overlay", 0, data)
        except OSError as e:
            if path == "/":
                raise SandboxError(f"cannot lay an overlay over the root file system: {e}") from e
            # Rare (a lower file system overlayfs refuses): read-only is still isolation; a
            # restore that needs to write there then fails and the drill says where.
            _read_only_bind(path, target, False)
            notes.append(f"{path} ({fstype}) is read-only inside: {e.strerror}")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.path.isdir(root + "/sys"):
        _mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.path.isdir(root + "/dev/mqueue"):
        _mount("mqueue", root + "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return root


def _read_only_bind(source: str, target: str, writable: bool) -> None:
    _mount(source, target, None, MS_BIND)
    if not writable:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def enter(root: str) -> None:
    """Make `root` the root of this mount namespace; the old one is detached."""
    os.chdir(root)
    if libc.syscall(SYS_PIVOT_ROOT, b".", b".") != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"pivot_root into the sandbox: {os.strerror(err)}")
    if libc.umount2(b".", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"detaching the host's root: {os.strerror(err)}")
    os.chdir("/")


def network() -> None:
    """Loopback up; binds to addresses this namespace lacks allowed (a checkpoint's listening
    socket on the host's address, or on another host's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    for sysctl in ("net/ipv4/ip_nonlocal_bind", "net/ipv6/ip_nonlocal_bind"):
        try:
            with open(f"/proc/sys/{sysctl}", "w") as f:
                f.write("1")
        except OSError:
            pass  # no IPv6 here: nothing to bind to there either


def reap() -> None:
    """Collect the zombies re-parented to this PID 1 (CRIU's helpers)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def census() -> tuple[int, int]:
    """(processes in this PID namespace but this one, how many of them are stopped)."""
    seen = stopped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == "1":
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2 :].split()[0]
        if state == "Z":
            continue
        seen += 1
        stopped += state in ("T", "t")
    return seen, stopped


def stopped_census() -> tuple[int, int]:
    """`census` once every restored process has stopped, or after a second. CRIU sends each
    SIGSTOP while it still traces it, then detaches: the signal stops it before it returns
    to its own code, but a moment after CRIU has exited (a thread group stops as a whole)."""
    deadline = time.monotonic() + 1.0
    while True:
        seen, stopped = census()
        if seen == stopped or time.monotonic() > deadline:
            return seen, stopped
        time.sleep(0.01)


def _copy_out(path: str, fd: int) -> None:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                os.write(fd, chunk)
    except OSError:
        pass


def drill(req: dict, out: dict) -> None:  # type: ignore[type-arg]
    work = req["work"]
    own = os.path.join(work, "mnt")
    _mount("tmpfs", own, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    out["stage"] = "sandbox"
    root = build_root(own, own, out["notes"])
    enter(root)
    network()
    out["stage"] = "restore"
    done = subprocess.run(
        req["criu"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=tuple(req.get("fds", ())),
        check=False,
    )
    out["criu_exit"] = done.returncode
    out["criu_output"] = done.stdout.decode(errors="replace")[-4000:]
    reap()
    if done.returncode != 0:
        return
    out["stage"] = "check"
    out["processes"], out["stopped"] = stopped_census()


def main() -> None:
    req = json.loads(sys.argv[1])
    work = req["work"]
    # Opened before the root changes: afterwards the host's files are out of reach.
    result = os.open(os.path.join(work, "result.json"), os.O_WRONLY | os.O_CREAT, 0o600)
    log = os.open(os.path.join(work, "restore.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    stats = os.open(os.path.join(work, "stats-restore"), os.O_WRONLY | os.O_CREAT, 0o600)
    out: dict = {"stage": "start", "notes": []}  # type: ignore[type-arg]
    for procs in req.get("cgroups", ()):
        try:
            with open(procs, "w") as f:
                f.write("0")
        except OSError as e:  # the drill runs on without it: only its priority is less
            out["notes"].append(f"not in its cgroup {os.path.dirname(procs)}: {e.strerror}")
    try:
        drill(req, out)
    except (SandboxError, OSError) as e:
        out["error"] = str(e)
    except Exception as e:  # reported, never a traceback the daemon cannot read
        out["error"] = f"{type(e).__name__}: {e}"
    if out["stage"] != "sandbox" and out["stage"] != "start":
        _copy_out(req["log"], log)
        _copy_out(req["stats"], stats)
    os.write(result, json.dumps(out).encode())
    # Everything else in this PID namespace dies now, stopped or not; the kernel would do it
    # when this process exits, but the census above must never race a late CRIU helper.
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    os._exit(0)


if __name__ == "__main__":
    main()
