"""`make install`, an upgrade over a running daemon, `make deb` and `make uninstall`, into a
temporary root (DESTDIR), run from a mount namespace in which that root's /opt is /opt.

The venv is built once per session (BUILDDIR in the session's folder) from a snapshot of the
checkout, so that other edits to the working tree during the run do not rebuild it; the
Debian package is made from the same build. The tests run in file order: the package is
compared with what `make install` put in place, and `make uninstall` comes last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import COUNTER, ROOT, Daemon, free_port, http_get
from tests.support.host import require_root_and_criu

PREFIX = "/opt/checkpointer"
ROOTFS = Path(os.environ.get("CHECKPOINTER_TEST_CACHE", "/var/cache/checkpointer-tests"))
SNAPSHOT = ["Makefile", "pyproject.toml", "README.md", "docs", "checkpointer", "storage",
            "scripts", "configs", "grafana", "packaging"]  # fmt: skip


@pytest.fixture(scope="module")
def session_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ckpt-install-"))
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def checkout(session_dir: Path) -> Path:
    src = session_dir / "checkout"
    for name in SNAPSHOT:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    return src


def make(checkout: Path, target: str, **variables: str | Path) -> subprocess.CompletedProcess[str]:
    args = [f"{k}={v}" for k, v in variables.items()]
    r = subprocess.run(
        ["make", "-s", "-C", str(checkout), target, *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, f"make {target} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(checkout: Path, session_dir: Path) -> Path:
    """`make install` into ROOT (the venv built here, once)."""
    require_root_and_criu()
    root = session_dir / "root"
    make(checkout, "install", DESTDIR=root, BUILDDIR=session_dir / "build")
    return root


class MountNamespace:
    """A private mount namespace in which /opt is ROOT/opt, held by a `sleep infinity`; every
    command runs in it through nsenter (which execs: a Popen's pid is the command's)."""

    def __init__(self, opt: Path) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             f'mount --bind "{opt}" /opt && echo ready && exec sleep infinity'],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert self.holder.stdout is not None
        assert self.holder.stdout.readline().strip() == "ready", "the mount namespace failed"

    def enter(self) -> list[str]:
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--"]

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.enter(), *cmd], capture_output=True, text=True, timeout=300)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@contextlib.contextmanager
def mount_namespace(opt: Path) -> Iterator[MountNamespace]:
    ns = MountNamespace(opt)
    try:
        yield ns
    finally:
        ns.close()


class InstalledDaemon(Daemon):
    """The daemon and CLI of the installed package, run in the namespace: what the unit's
    ExecStart starts."""

    def __init__(self, base: Path, ns: MountNamespace, exe: str) -> None:
        super().__init__(base, extra_config="metrics:\n  enabled: false\n")
        self.prefix = ns.enter()
        self.exe = exe

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, self.exe, "daemon", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=self.base,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while self.cli("status", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.2)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.prefix, self.exe, args[0], "--config", str(self.config), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.base, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {r.stderr}\n{self.log.read_text()[-3000:]}")
        return r


def test_make_install_puts_everything_in_place_and_the_unit_verifies(
    installed: Path, session_dir: Path
) -> None:
    root = installed
    venv = root / PREFIX.lstrip("/") / "venv"
    link = root / "usr/local/bin/checkpointer"
    assert os.readlink(link) == f"{PREFIX}/venv/bin/checkpointer"
    assert (venv / "bin/checkpointer").read_text().startswith(f"#!{PREFIX}/venv/bin/python")
    unit = root / "usr/local/lib/systemd/system/checkpointer.service"
    text = unit.read_text()
    assert f"ExecStart={PREFIX}/venv/bin/checkpointer daemon --config " in text
    assert "OOMPolicy=continue" in text and "EnvironmentFile=-/etc/checkpointer/env" in text
    etc = root / "etc/checkpointer"
    assert etc.stat().st_mode & 0o777 == 0o700
    for name in ("config.yaml", "env"):
        assert (etc / name).stat().st_mode & 0o777 == 0o600
    assert (etc / "config.yaml").read_text() == (ROOT / "configs/checkpointer.yaml").read_text()
    assert (root / PREFIX.lstrip("/") / "share/configs/prometheus-alerts.yaml").is_file()
    # The unit's Documentation= names the README and troubleshooting; the README links into docs/.
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(p.name for p in (root / PREFIX.lstrip("/") / "docs").glob("*.md")) == docs
    assert f"file://{PREFIX}/docs/troubleshooting.md" in text

    config = session_dir / "doctor.yaml"
    config.write_text(f"state_dir: {session_dir / 'doctor-state'}\n")
    with mount_namespace(root / "opt") as ns:
        verify = ns.run("systemd-analyze", "verify", str(unit))
        assert verify.returncode == 0 and not verify.stdout + verify.stderr, verify
        # The installed default config validates, and doctor runs from the installed path.
        r = ns.run(str(link), "doctor", "--config", str(config), "--json")
        assert r.returncode == 0, r.stderr
        checks = {c["name"]: c for c in json.loads(r.stdout)}
        assert checks["criu version"]["ok"] and checks["repository (local folder)"]["ok"]
        r = ns.run(f"{PREFIX}/venv/bin/python", "-c",
                   "import sys, pathlib; from checkpointer.config import load_config; "
                   "load_config(pathlib.Path(sys.argv[1]))", str(etc / "config.yaml")
                   )  # fmt: skip
        assert r.returncode == 0, r.stderr


def test_a_reinstall_is_fast_and_keeps_an_edited_config_and_the_key(
    installed: Path, checkout: Path, session_dir: Path
) -> None:
    etc = installed / "etc/checkpointer"
    config = etc / "config.yaml"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    key = etc / "repository.key"
    key.write_text("the repository's key\n")
    key.chmod(0o600)
    venv = installed / PREFIX.lstrip("/") / "venv"
    before = venv.stat().st_ino
    t0 = time.monotonic()
    make(checkout, "install", DESTDIR=installed, BUILDDIR=session_dir / "build")
    assert time.monotonic() - t0 < 15
    assert config.read_text().endswith("# edited by the operator\n")
    assert key.read_text() == "the repository's key\n"
    assert venv.stat().st_ino == before  # up to date: left alone


def test_an_upgrade_over_a_running_daemon_keeps_the_workload_running(
    installed: Path, checkout: Path, session_dir: Path, workdir: Path
) -> None:
    """The venv is replaced under the running daemon, which is then restarted as the unit
    does (KillMode=process: SIGTERM to the daemon alone, then ExecStart again): it re-adopts
    the tree, same PID, same in-memory state, no restore."""
    venv = installed / PREFIX.lstrip("/") / "venv"
    with mount_namespace(installed / "opt") as ns:
        d = InstalledDaemon(workdir, ns, f"{PREFIX}/venv/bin/checkpointer")
        try:
            d.start()
            port = free_port()
            d.cli("run", "web", "--every", "1h", "--", sys.executable, str(COUNTER), str(port))
            for _ in range(3):
                http_get(port)
            pid = d.pid("web")
            before = venv.stat().st_ino
            make(checkout, "install", DESTDIR=installed, BUILDDIR=session_dir / "build",
                 REBUILD="1")  # fmt: skip
            assert venv.stat().st_ino != before  # a new venv is in place
            d.terminate()
            assert http_get(port) == "4"  # the tree outlived its daemon
            d.start()
            st = d.wait_for("web", lambda s: s["state"] == "running")
            assert st["pid"] == pid and st["restores"] == [], st
            assert http_get(port) == "5"
        finally:
            d.stop()


def test_make_deb_installs_with_dpkg_and_holds_what_make_install_installs(
    installed: Path, checkout: Path, session_dir: Path
) -> None:
    rootfs = ROOTFS / "rootfs-v1"
    if not (rootfs / "usr/bin/python3").exists():
        pytest.fail(f"{rootfs} is missing: `make containers` (part of `make test`) builds it")
    out = session_dir / "deb"
    make(checkout, "deb", BUILDDIR=session_dir / "build", OUTDIR=out)
    (deb,) = out.glob("checkpointer_*.deb")
    ov = session_dir / "overlay"
    for sub in ("upper", "work", "merged"):
        (ov / sub).mkdir(parents=True)
    merged = ov / "merged"
    # The tests' debootstrap root, seen through an overlay (the cached copy stays as it was).
    # python3.11 there is python3.11-minimal: --force-depends, the files are what is tested.
    script = f"""set -e
mount -t overlay overlay -o lowerdir={rootfs},upperdir={ov}/upper,workdir={ov}/work {merged}
dpkg --root={merged} --force-depends -i {deb} >{ov}/install 2>&1 || {{ cat {ov}/install; exit 1; }}
cp -a {merged}/opt {merged}/etc/checkpointer {merged}/lib/systemd/system/checkpointer.service \\
    {ov}/
readlink {merged}/usr/bin/checkpointer >{ov}/link
mount --bind {merged}/opt /opt
systemd-analyze verify {merged}/lib/systemd/system/checkpointer.service >{ov}/verify 2>&1
echo "the key" >{merged}/etc/checkpointer/repository.key
dpkg --root={merged} --purge checkpointer >{ov}/purge 2>&1
ls -A {merged}/etc/checkpointer >{ov}/after-purge
test ! -e {merged}/opt/checkpointer
"""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                        script], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert (ov / "verify").read_text() == ""
    assert (ov / "link").read_text().strip() == f"{PREFIX}/venv/bin/checkpointer"
    assert (ov / "after-purge").read_text().split() == ["repository.key"]
    assert "kept the key files" in (ov / "purge").read_text()

    def tree(top: Path) -> dict[str, tuple[int, bytes]]:
        files = {}
        for path in sorted(top.rglob("*")):
            rel = path.relative_to(top)
            if "__pycache__" in rel.parts or path.is_dir():
                continue
            data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            files[str(rel)] = (path.lstat().st_mode, data)
        return files

    ours, theirs = tree(installed / "opt"), tree(ov / "opt")
    assert len(ours) > 2000 and ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
    unit = installed / "usr/local/lib/systemd/system/checkpointer.service"
    assert (ov / "checkpointer.service").read_bytes() == unit.read_bytes()
    for name in ("config.yaml", "env"):
        shipped = ROOT / "configs" / ("checkpointer.yaml" if name == "config.yaml" else
                                      "checkpointer.env")  # fmt: skip
        assert (ov / "checkpointer" / name).read_bytes() == shipped.read_bytes()
        assert (ov / "checkpointer" / name).stat().st_mode & 0o777 == 0o600


def test_make_uninstall_keeps_config_key_and_state(
    installed: Path, checkout: Path, session_dir: Path
) -> None:
    state = installed / "var/lib/checkpointer"
    state.mkdir(parents=True)
    make(checkout, "uninstall", DESTDIR=installed)
    assert not (installed / "opt/checkpointer").exists()
    assert not (installed / "usr/local/bin/checkpointer").is_symlink()
    assert not (installed / "usr/local/lib/systemd/system/checkpointer.service").exists()
    etc = installed / "etc/checkpointer"
    assert sorted(p.name for p in etc.iterdir()) == ["config.yaml", "env", "repository.key"]
    assert state.is_dir()
    make(checkout, "uninstall", DESTDIR=installed, PURGE="all")
    assert not etc.exists() and not state.exists()
