"""CRIU's probe cache (checkpointer/criu/kdat_cache.py): the daemon makes the folder the CRIU
built by scripts/install-criu.sh looks in a root-only tmpfs, and CRIU then starts from the
cache instead of probing the kernel. Each case that mounts runs in a mount namespace of its
own (`unshare -m`), so the host's folders are never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from checkpointer.criu import kdat_cache
from tests.support.host import require_root_and_criu

ROOT = Path(__file__).resolve().parent.parent
CRIU = shutil.which("criu")


def in_own_mount_namespace(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as root in a private mount namespace; its output."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_criu_starts_from_the_cache_once_the_daemon_mounted_it(tmp_path: Path) -> None:
    require_root_and_criu()
    assert CRIU is not None and kdat_cache.uses_folder(CRIU), (
        f"the CRIU on PATH ({CRIU}) is not the one scripts/install-criu.sh builds, which keeps "
        "its probe cache in a folder: run `make setup`"
    )
    # The folder starts as a plain directory on the root file system (as after a reboot on
    # a host whose /run is not tmpfs); ensure() mounts the tmpfs and the second CRIU run
    # loads what the first one probed.
    r = in_own_mount_namespace(f"""
        import subprocess, sys
        from pathlib import Path
        from checkpointer.criu import kdat_cache
        d = kdat_cache.KDAT_DIR
        subprocess.run(["umount", str(d)], capture_output=True)
        assert kdat_cache.fs_type(d) != "tmpfs", "still a tmpfs after umount"
        print(kdat_cache.status({CRIU!r})[0])
        print(kdat_cache.ensure({CRIU!r}))
        print(kdat_cache.status({CRIU!r})[0])
        print("type", kdat_cache.fs_type(d), oct(d.stat().st_mode & 0o777), d.stat().st_uid)
        for n in (1, 2):
            subprocess.run([{CRIU!r}, "check", "-v4", "--log-file", f"{tmp_path}/kdat-{{n}}.log"],
                           check=True, capture_output=True)
        print(open("{tmp_path}/kdat-2.log").read())
        (d / "criu.kdat.tmp").write_bytes(b"")  # as a CRIU killed mid-save leaves it
        print(kdat_cache.ensure({CRIU!r}))
        print("stale tmp", (d / "criu.kdat.tmp").exists())
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "False"  # what `doctor` says before
    assert lines[1] == f"mounted a tmpfs on {kdat_cache.KDAT_DIR} for CRIU's probe cache"
    assert lines[2] == "True"
    assert lines[3] == "type tmpfs 0o700 0"
    assert f"Loaded kdat cache from {kdat_cache.KDAT_DIR}/criu.kdat" in r.stdout
    assert lines[-2] == f"CRIU keeps its probe cache in {kdat_cache.KDAT_DIR} (tmpfs)"
    assert lines[-1] == "stale tmp False"  # else every later save would give up


def test_another_criu_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "criu"
    other.write_bytes(b"\x7fELF... /run/criu.kdat ...")
    folder = tmp_path / "cache"
    assert "not ours" in kdat_cache.ensure(str(other), folder)
    assert not folder.exists()


def test_a_folder_of_another_user_is_not_mounted_over(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    fake = tmp_path / "criu"
    fake.write_bytes(f"...{folder}/criu.kdat...".encode())
    said = kdat_cache.ensure(str(fake), folder)
    assert said == (
        f"{folder} is not a folder of root's with mode 0700: CRIU runs without its probe cache"
    )
    assert kdat_cache.fs_type(folder) != "tmpfs"


def test_a_folder_others_may_write_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    fake = tmp_path / "criu"
    fake.write_bytes(f"...{folder}/criu.kdat...".encode())
    folder.chmod(0o755)
    assert "with mode 0700" in kdat_cache.ensure(str(fake), folder)
    folder.chmod(0o700)
    tmp_path.chmod(0o777)  # the folder is fine, but anyone could swap it for their own
    try:
        said = kdat_cache.ensure(str(fake), folder)
    finally:
        tmp_path.chmod(0o700)
    assert said == f"{tmp_path} is writable by others than root: CRIU runs without its probe cache"
    assert kdat_cache.fs_type(folder) != "tmpfs"


def test_a_missing_folder_is_made_and_mounted(tmp_path: Path) -> None:
    # Under tmp_path (not tmpfs), in a namespace of its own: made 0700, then mounted.
    folder = tmp_path / "cache"
    fake = tmp_path / "criu"
    fake.write_bytes(f"...{folder}/criu.kdat...".encode())
    r = in_own_mount_namespace(f"""
        from pathlib import Path
        from checkpointer.criu import kdat_cache
        print(kdat_cache.ensure({str(fake)!r}, Path({str(folder)!r})))
        print(kdat_cache.fs_type(Path({str(folder)!r})))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"mounted a tmpfs on {folder} for CRIU's probe cache",
        "tmpfs",
    ]
    assert kdat_cache.fs_type(folder) != "tmpfs"  # only inside that namespace
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
