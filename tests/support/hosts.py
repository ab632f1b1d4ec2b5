"""Several "hosts" on this one machine, for the fleet tests: each host is a network namespace
and a mount namespace of its own, in which a real daemon runs.

    with Network(workdir) as net:               # a bridge, and moto_server on its address
        bucket = net.moto.create_bucket("b")
        a = net.add_host("a", s3_config(net.moto, bucket))
        a.start()                               # the daemon, inside A's namespaces
        a.cli("run", "web", "--", ...)          # the CLI, inside them too
        a.http_get(port)                        # 127.0.0.1:PORT as A sees it

Isolation. `Network` puts a Linux bridge (ckb<id>) with 10.213.X.1/24 in the root namespace
and moto_server listens on that address only. Each host gets a network namespace (ck<id>-NAME)
with its own loopback and one end of a veth pair (10.213.X.N/24; the other end is on the
bridge), so 127.0.0.1:PORT on one host is not on another, and every host reaches moto at
http://10.213.X.1:PORT. A kernel without bridges gets the fallback: one routed veth pair per
host (`Network.mode` says which). Each host also gets a UTS namespace (hostname NAME, so the
default host.id is NAME) and a mount namespace, held by an "anchor" process (`sleep infinity`
under `unshare --mount --uts --propagation private`), with a fresh tmpfs on the network's
folder /run/ckhosts-<id> and another on /dev/shm: the host's private folder
/run/ckhosts-<id>/NAME (its state folder inside) exists in that namespace only, so no other
host (nor the test, but through `Host.view`) sees it, and hosts share no scratch in /dev/shm.
The daemon, the CLI and every helper run under `nsenter --target ANCHOR --mount --uts --net`,
which execs: the daemon's PID is the Popen's, and its workloads are its children (it is their
subreaper). The host's disk outlives its daemon: stop() then start() finds the same state.
The config, the key file and the daemon's log stay in BASE (WORKDIR/NAME, root's temp folder,
seen by all), so the log can be read after the host is gone.

Everything is torn down at the end, also after a failure: the processes of each host (found
by PID: those in the host's network namespace, which only this code puts processes in), the
anchors, the namespaces, the veths, the bridge, moto_server and the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from tests.support.daemon import Daemon
from tests.support.leftovers import made
from tests.support.moto_server import S3_ENV, Moto
from tests.support.paths import ROOT
from tests.support.processes import start_time, tree_pids
from tests.support.workers import share

SUBNET_PREFIX = "10.213"
HOSTS_ROOT = Path("/run")
_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")

# Run in a host's namespaces with its arguments in argv (never in the code): URL, timeout per
# attempt, total time to keep retrying, number of requests. Prints the last answer.
_HTTP_GET = """
import sys, time, urllib.request
url, each, total, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
last = ""
for _ in range(n):
    deadline = time.monotonic() + total
    while True:
        try:
            with urllib.request.urlopen(url, timeout=each) as r:
                last = r.read().decode().strip()
            break
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"{url}: {e}")
            time.sleep(0.05)
print(last)
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip ARGS` (iproute2); on failure an error that says what failed."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def netns_processes(netns_file: Path, exclude: tuple[int, ...] = ()) -> list[int]:
    """The PIDs of the processes in the network namespace that `netns_file` holds."""
    try:
        ns = os.stat(netns_file)
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in exclude:
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                out.append(int(entry))
    return out


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


def free_subnet() -> str:
    """10.213.X with X unused by any interface here. X is drawn from this test worker's share
    of 1..254, so parallel workers never pick the same one between the check and `ip addr
    add`; other concurrent runs pick another at random."""
    used = ip("-o", "-4", "addr", "show").stdout
    mine = share(1, 254)
    for _ in range(100):
        subnet = f"{SUBNET_PREFIX}.{mine[secrets.randbelow(len(mine))]}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError(f"no free {SUBNET_PREFIX}.X/24 subnet")


class Network:
    """A bridge in the root namespace, moto_server on its address, and the hosts on it. Use it
    as a context manager (or call close()): everything it made is removed at the end.

    `routed=True` forces the fallback used where the kernel has no bridges: one veth pair per
    host, routed from the root namespace."""

    def __init__(self, workdir: Path, routed: bool = False) -> None:
        if shutil.which("ip") is None:
            raise RuntimeError("the hosts need iproute2 (`ip`): apt-get install iproute2")
        for tool in ("nsenter", "unshare", "mount"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"the hosts need {tool} (util-linux)")
        self.workdir = workdir
        self.id = secrets.token_hex(3)
        self.subnet = free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"ckb{self.id}"  # the bridge, or in routed mode the veth holding .1
        self.root = HOSTS_ROOT / f"ckhosts-{self.id}"
        self.hosts: list[Host] = []
        self._moto: Moto | None = None
        self.mode = "routed" if routed else "bridge"
        self._links: list[str] = []
        try:
            self.root.mkdir(mode=0o700)
            self._links.append(self.bridge)
            if not routed:
                r = ip("link", "add", self.bridge, "type", "bridge", check=False)
                if r.returncode != 0:
                    self.mode = "routed"
            if self.mode == "routed":
                ip("link", "add", self.bridge, "type", "veth", "peer", "name", f"{self.bridge}p")
                ip("link", "set", f"{self.bridge}p", "up")
                ip("addr", "add", f"{self.gateway}/32", "dev", self.bridge)
            else:
                ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            self._moto = Moto(host=self.gateway)
        except BaseException:
            self.close()
            raise

    @property
    def moto(self) -> Moto:
        """The S3 server, at http://10.213.X.1:PORT (`moto.url`) for every host."""
        if self._moto is None:
            raise RuntimeError("the network is closed")
        return self._moto

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add_host(self, name: str, extra_config: str = "", key_file: Path | None = None) -> Host:
        """A new host NAME (a lowercase letter, then up to 7 letters or digits), booted: its
        namespaces exist, its daemon is not started yet. Its config, key file and log are
        in WORKDIR/NAME."""
        if not _NAME.fullmatch(name) or any(h.name == name for h in self.hosts):
            raise ValueError(f"bad or duplicate host name {name!r}")
        base = self.workdir / name
        base.mkdir(mode=0o700)
        host = Host(self, name, len(self.hosts) + 10, base, extra_config, key_file)
        self.hosts.append(host)
        try:
            host.boot()
        except BaseException:
            host.close()
            raise
        return host

    def close(self) -> None:
        """Tear everything down, going on past failures; the first one is raised at the end."""
        errors: list[BaseException] = []
        for host in reversed(self.hosts):
            try:
                host.close()
            except Exception as e:  # every host is torn down regardless
                errors.append(e)
        if self._moto is not None:
            try:
                self._moto.stop()
            except Exception as e:
                errors.append(e)
            self._moto = None
        for link in self._links:
            if ip("link", "show", link, check=False).returncode == 0:
                r = ip("link", "del", link, check=False)
                if r.returncode != 0:
                    errors.append(RuntimeError(f"ip link del {link}: {r.stderr.strip()}"))
        self._links = []
        try:
            if self.root.exists():
                self.root.rmdir()  # empty here: each host's files were on its own tmpfs
        except OSError as e:
            errors.append(e)
        if errors:
            raise errors[0]

    def leftovers(self) -> list[str]:
        """What of this network is still there (namespaces, links, the folder): [] when torn
        down."""
        out = [n for n in ip("netns", "list").stdout.split() if n.startswith(f"ck{self.id}")]
        out += [
            n for n in re.findall(r"^\d+: ([^:@]+)", ip("-o", "link").stdout, re.M) if self.id in n
        ]
        if self.root.exists():
            out.append(str(self.root))
        return out


class Host(Daemon):
    """One host on a Network: a network namespace, a mount namespace with a private folder
    (`folder`, the state folder in it) and /dev/shm, and a daemon run in them. Everything of
    Daemon works (start, cli, json, status, wait_for, pid, checkpoint, workload_log, stop),
    inside the host's namespaces."""

    def __init__(
        self,
        net: Network,
        name: str,
        number: int,
        base: Path,
        extra_config: str,
        key_file: Path | None,
    ) -> None:
        self.net = net
        self.name = name
        self.address = f"{net.subnet}.{number}"
        self.netns = f"ck{net.id}-{name}"
        self.netns_file = Path("/run/netns") / self.netns
        self.veth = f"ckv{net.id}n{number}"  # at most 15 characters
        self.folder = net.root / name  # exists inside this host's mount namespace only
        super().__init__(base, extra_config, key_file, state_dir=self.folder / "state")
        self.env.update(S3_ENV)
        self.anchor: subprocess.Popen[bytes] | None = None
        self._frozen: list[int] = []

    # -- the machine ---------------------------------------------------------------------

    def boot(self) -> None:
        """Make the namespaces and the private folders (add_host does it)."""
        net = self.net
        ip("netns", "add", self.netns)
        made("netns", self.netns_file)  # close() removes it
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        ip("-n", self.netns, "link", "set", "lo", "up")
        if net.mode == "bridge":
            ip("link", "set", self.veth, "master", net.bridge, "up")
            ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
            ip("-n", self.netns, "link", "set", "eth0", "up")
        else:
            ip("link", "set", self.veth, "up")
            ip("route", "add", f"{self.address}/32", "dev", self.veth)
            ip("-n", self.netns, "addr", "add", f"{self.address}/32", "dev", "eth0")
            ip("-n", self.netns, "link", "set", "eth0", "up")
            ip("-n", self.netns, "route", "add", f"{net.gateway}/32", "dev", "eth0")
        # The anchor holds the mount namespace for the host's whole life (its "disk").
        self.anchor = subprocess.Popen(
            [
                *("nsenter", f"--net={self.netns_file}", "--"),
                *("unshare", "--mount", "--uts", "--propagation", "private", "--"),
                *("sleep", "infinity"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )
        own = os.stat("/proc/self/ns/mnt").st_ino
        deadline = time.monotonic() + 10
        while True:  # nsenter execs unshare, which unshares and execs sleep: same PID
            try:
                ready = Path(f"/proc/{self.anchor.pid}/comm").read_text().strip() == "sleep"
                ready = ready and os.stat(f"/proc/{self.anchor.pid}/ns/mnt").st_ino != own
            except OSError:
                ready = False
            if ready:
                break
            if self.anchor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: its mount namespace did not come up")
            time.sleep(0.01)
        self.prefix = [
            "nsenter",
            f"--target={self.anchor.pid}",
            "--mount",
            "--uts",
            "--net",
            f"--wd={self.base}",  # the workloads' working directory: see Daemon.cli
            "--",
        ]
        mount = [*self.prefix, "mount", "-t", "tmpfs"]
        self._must([*mount, "-o", "mode=0700", f"ckhost-{self.name}", str(self.net.root)])
        self._must([*mount, "-o", "mode=1777", f"ckshm-{self.name}", "/dev/shm"])
        self.view(self.folder).mkdir(mode=0o700)
        self._must([*self.prefix, "hostname", self.name])  # the default host.id

    def _must(self, cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"host {self.name}: {' '.join(cmd)}: {r.stderr.strip()}")

    def view(self, path: Path | str) -> Path:
        """Where the test (in the root namespaces) sees PATH as this host sees it, while the
        host is up: /proc/ANCHOR/root/PATH."""
        assert self.anchor is not None, "the host is not booted"
        return Path(f"/proc/{self.anchor.pid}/root") / Path(path).relative_to("/")

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside the host's namespaces (cwd: BASE), its output captured."""
        return subprocess.run(
            [*self.prefix, *argv], capture_output=True, text=True, timeout=timeout
        )

    def processes(self) -> list[int]:
        """Every process in the host (its network namespace), but the anchor."""
        anchor = (self.anchor.pid,) if self.anchor else ()
        return netns_processes(self.netns_file, exclude=anchor)

    # -- HTTP from inside ----------------------------------------------------------------

    def http_get(
        self, port: int, timeout: float = 10.0, path: str = "/", address: str = "127.0.0.1"
    ) -> str:
        """GET http://ADDRESS:PORT/PATH from inside the host, retrying for `timeout` seconds
        while nothing listens; AssertionError if it never answers."""
        return self.serve(port, 1, timeout, path, address)

    def serve(
        self,
        port: int,
        n: int,
        timeout: float = 10.0,
        path: str = "/",
        address: str = "127.0.0.1",
    ) -> str:
        """Make n requests from inside the host (one subprocess); the last answer."""
        url = f"http://{address}:{port}{path}"
        each = str(min(5.0, max(timeout, 0.5)))
        r = self.run(sys.executable, "-c", _HTTP_GET, url, each, str(timeout), str(n))
        if r.returncode != 0:
            raise AssertionError(f"host {self.name}: {r.stderr.strip()}")
        return r.stdout.strip()

    def connects(self, port: int, address: str = "127.0.0.1") -> bool:
        """Whether an HTTP GET to ADDRESS:PORT from inside the host answers at once."""
        try:
            self.serve(port, 1, 0.0, "/", address)
        except AssertionError:
            return False
        return True

    # -- the daemon's files, through the host's eyes ---------------------------------------

    def api_socket(self) -> Path:
        return self.view(super().api_socket())

    def workload_log(self, name: str) -> str:
        path = self.view(self.state / "logs" / f"{name}.log")
        return path.read_text() if path.exists() else ""

    def drop_kept_images(self, disk: bool = True) -> None:
        from checkpointer.engine import tmpfs_scratch_root

        shutil.rmtree(self.view(tmpfs_scratch_root(self.state) / "hot"), ignore_errors=True)
        if disk:
            shutil.rmtree(self.view(self.state / "images"), ignore_errors=True)

    def kill_workloads(self) -> None:
        if self.anchor is None:
            return
        registry = self.view(self.state / "workloads.json")
        if registry.exists():
            for w in json.loads(registry.read_text())["workloads"]:
                if w["pid"] and start_time(int(w["pid"])) == w["started"]:
                    _kill_all(tree_pids(int(w["pid"])))
        self._kill_rest()

    def _kill_rest(self) -> None:
        """kill -9 whatever is still in the host (but the anchor) and wait until it is gone."""
        deadline = time.monotonic() + 10
        while pids := self.processes():
            _kill_all(pids)
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: processes {pids} do not die")
            time.sleep(0.02)

    # -- the daemon's life -----------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the daemon (it restores nothing more), then kill -9 every workload it had
        and anything else left in the host. Its state folder stays (start() finds it)."""
        self.thaw()
        self.terminate()
        self.kill_workloads()

    def kill9(self) -> None:
        """The host dies: kill -9 its daemon and its workloads at once (its folder stays, as a
        disk would; the log is in BASE)."""
        self._frozen = []
        self._kill_rest()
        if self.proc is not None:
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP the daemon and every workload (a host that hangs); thaw() resumes them."""
        pids = self.processes()
        if self.proc is not None and self.proc.pid in pids:  # the daemon first
            pids.remove(self.proc.pid)
            pids.insert(0, self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._frozen = pids

    def thaw(self) -> None:
        """SIGCONT what freeze() stopped; returns once all run again and the daemon has taken
        the SIGCHLDs this sends it (a SIGTERM sent while one is pending can be lost: see
        _settle)."""
        if not self._frozen:
            return
        pids = [*reversed(self._frozen), *self.processes()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []
        deadline = time.monotonic() + 5
        while any(_state(p) == "T" for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._settle()

    def _settle(self) -> None:
        """Wait (at most 2 s) until the daemon has no signal pending. The kernel gives a
        signal sent to a process to its main thread unless that one has a signal pending
        already; then another thread takes it, and the daemon's main thread, blocked in
        stop.wait(3600), misses a SIGTERM (checkpointer/daemon/main.py)."""
        if self.proc is None:
            return
        status = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/status")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                fields = dict(
                    line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
                )
            except OSError:
                return
            if int(fields["SigPnd"], 16) == 0 and int(fields["ShdPnd"], 16) == 0:
                break
            time.sleep(0.01)
        time.sleep(0.05)

    def close(self) -> None:
        """Stop everything in the host, then remove its namespaces and veth."""
        try:
            if self.anchor is not None:
                self.stop()
        finally:
            if self.anchor is not None:
                if self.anchor.poll() is None:
                    self.anchor.kill()
                self.anchor.wait()
                self.anchor = None
            _kill_all(netns_processes(self.netns_file))  # nothing should be left; be sure
            if self.netns_file.exists():
                ip("netns", "del", self.netns)
            # Deleting the namespace deletes the veth pair, a moment later.
            ip("link", "del", self.veth, check=False)
            deadline = time.monotonic() + 10
            while ip("link", "show", self.veth, check=False).returncode == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"host {self.name}: veth {self.veth} is still there")
                time.sleep(0.05)
