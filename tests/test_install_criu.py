"""scripts/criu-source-version.sh, the part of scripts/install-criu.sh that picks which CRIU to
build, on fake `apt-cache showsrc criu` outputs (nothing is downloaded or installed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PICK = ROOT / "scripts" / "criu-source-version.sh"

SHA_421 = "29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9"
SHA_430 = "a" * 64
SHA_411 = "b" * 64


def stanza(version: str, upstream: str, sha: str, package: str = "criu") -> str:
    """One source stanza as `apt-cache showsrc` prints it (abridged)."""
    return f"""Package: {package}
Binary: criu, libcriu2, libcriu-dev, python3-pycriu, libcompel1, libcompel-dev
Version: {version}
Maintainer: Salvatore Bonaccorso <carnil@debian.org>
Build-Depends: asciidoc, debhelper-compat (= 13), libbsd-dev
Format: 3.0 (quilt)
Files:
 680c50418f796b55464947dc117a7cf4 2901 criu_{version}.dsc
 15af4ed4460591e31fc5be6cab994ac9 1038700 criu_{upstream}.orig.tar.xz
 fa44a793db247d17dce76d0cf84033b9 12964 criu_{version}.debian.tar.xz
Checksums-Sha256:
 {"1" * 64} 2901 criu_{version}.dsc
 {sha} 1038700 criu_{upstream}.orig.tar.xz
 {"2" * 64} 12964 criu_{version}.debian.tar.xz
Homepage: https://www.criu.org/
Package-List:
 criu deb admin optional arch=amd64,arm64,ppc64el,riscv64,s390x
Directory: pool/main/c/criu
Priority: optional
Section: misc

"""


def pick(tmp_path: Path, showsrc: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "showsrc.txt"
    fake.write_text(showsrc)
    return subprocess.run(
        ["bash", str(PICK), str(fake)], capture_output=True, text=True, timeout=30
    )


def picked(tmp_path: Path, showsrc: str) -> list[str]:
    r = pick(tmp_path, showsrc)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_only_the_tested_version(tmp_path: Path) -> None:
    assert picked(tmp_path, stanza("4.2.1-1", "4.2.1", SHA_421)) == [
        "4.2.1-1",
        "4.2.1",
        "criu_4.2.1.orig.tar.xz",
        SHA_421,
    ]


@pytest.mark.parametrize("order", ["old-first", "new-first"])
def test_the_newest_version_offered(tmp_path: Path, order: str) -> None:
    stanzas = [stanza("4.2.1-1", "4.2.1", SHA_421), stanza("4.3.0-1", "4.3.0", SHA_430)]
    if order == "new-first":
        stanzas.reverse()
    assert picked(tmp_path, "".join(stanzas)) == [
        "4.3.0-1",
        "4.3.0",
        "criu_4.3.0.orig.tar.xz",
        SHA_430,
    ]


def test_debian_ordering_of_versions(tmp_path: Path) -> None:
    """dpkg's ordering, not the text's: 4.10 > 4.9, a later revision wins, an epoch strips."""
    out = stanza("4.9-1", "4.9", SHA_411) + stanza("4.10-1", "4.10", SHA_430)
    assert picked(tmp_path, out)[:2] == ["4.10-1", "4.10"]
    out = stanza("4.2.1-1", "4.2.1", SHA_421) + stanza("4.2.1-2", "4.2.1", SHA_421)
    assert picked(tmp_path, out)[0] == "4.2.1-2"
    assert picked(tmp_path, stanza("1:4.3.0-1", "4.3.0", SHA_430))[:3] == [
        "1:4.3.0-1",
        "4.3.0",
        "criu_4.3.0.orig.tar.xz",
    ]


def test_an_older_version_and_other_packages_are_ignored(tmp_path: Path) -> None:
    """Bookworm's 3.17 beside sid's 4.2.1 (both deb-src), and a stanza of another package."""
    out = (
        stanza("3.17.1-2+deb12u1", "3.17.1", SHA_411)
        + stanza("4.2.1-1", "4.2.1", SHA_421)
        + stanza("9.0-1", "9.0", SHA_430, package="not-criu")
    )
    assert picked(tmp_path, out)[0] == "4.2.1-1"


def test_only_an_older_version_is_a_clear_error(tmp_path: Path) -> None:
    r = pick(tmp_path, stanza("4.1.1-1", "4.1.1", SHA_411))
    assert r.returncode == 1
    assert r.stdout == ""
    assert "criu 4.1.1-1" in r.stderr
    assert "older than the tested 4.2.1" in r.stderr


@pytest.mark.parametrize("showsrc", ["", "W: Unable to locate package criu\n"])
def test_nothing_offered_is_a_clear_error(tmp_path: Path, showsrc: str) -> None:
    r = pick(tmp_path, showsrc)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "no criu source package" in r.stderr
    assert "deb-src" in r.stderr


def test_a_version_without_a_tarball_checksum_is_a_clear_error(tmp_path: Path) -> None:
    out = stanza("4.3.0-1", "4.3.0", SHA_430).replace(
        f" {SHA_430} 1038700 criu_4.3.0.orig.tar.xz\n", ""
    )
    r = pick(tmp_path, out)
    assert r.returncode == 1
    assert "no Checksums-Sha256" in r.stderr


def test_install_script_is_valid_bash() -> None:
    for script in (PICK, ROOT / "scripts" / "install-criu.sh"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
