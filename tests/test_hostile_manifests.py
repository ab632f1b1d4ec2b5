"""A repository is input from whoever can write it: crafted manifests, indexes and oversized
objects are refused as corrupt before anything is written outside the image folder or
allocated (a repository in clear, where nothing authenticates them)."""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storage import CorruptCheckpoint, Repository
from storage.backends import LocalBlobStore
from storage.keys import index_key, manifest_key
from storage.manifest import DIGEST_SIZE, Manifest, check_workload_name, is_checkpoint_id
from storage.packs import MAX_INDEX_BYTES

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Repository, Path, str, Path]:
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(3 * 4096))
    (src / "core-1.img").write_bytes(b"core" * 100)
    cid = repo.commit("web", src).id
    victim = tmp_path / "victim"
    victim.write_text("precious")
    return repo, tmp_path, cid, victim


def rewrite(
    repo: Repository,
    root: Path,
    cid: str,
    change: Callable[[dict[str, Any]], None],
    fmt: str = "json",
) -> None:
    """Plant the checkpoint's manifest changed by `change` (given as a format 1 document),
    written in format 1 (`json`) or 2 (`binary`: each file's chunk list becomes its count
    and its digests, whatever their length, follow the header)."""
    path = root / "repo" / manifest_key("web", cid)
    doc = json.loads(bytes(Manifest.parse(path.read_bytes(), "test").to_json()))
    change(doc)
    path.chmod(0o600)
    path.write_bytes(json.dumps(doc).encode() if fmt == "json" else binary(doc))
    repo._summaries.clear()


def binary(doc: dict[str, Any], extra: bytes = b"") -> bytes:
    digests = b""
    if isinstance(doc.get("files"), list):
        for f in doc["files"]:
            d = base64.b64decode(f["chunks"])
            f["chunks"] = -(-len(d) // DIGEST_SIZE)
            digests += d
    doc["version"] = 2
    header = json.dumps(doc).encode()
    return b"CKPTMAN2" + struct.pack("<I", len(header)) + header + digests + extra


def first_file(doc: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in doc["files"] if f["name"] == "pages-1.img")


CASES: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "absolute name": lambda d, v: first_file(d).update(name=str(v)),
    "dotdot name": lambda d, v: first_file(d).update(name="../victim"),
    "name with a slash": lambda d, v: first_file(d).update(name="sub/pages-1.img"),
    "odd digest list": lambda d, v: first_file(d).update(
        chunks=base64.b64encode(base64.b64decode(first_file(d)["chunks"])[:-5]).decode()
    ),
    "8 TiB declared": lambda d, v: first_file(d).update(size=8 << 40),
    "negative size": lambda d, v: first_file(d).update(size=-1),
    "size as a string": lambda d, v: first_file(d).update(size="12288"),
    "a file twice": lambda d, v: d["files"].append(dict(first_file(d))),
    "a pack id that is a path": lambda d, v: d["packs"].append("../../victim"),
    "files not a list": lambda d, v: d.update(files={"a": 1}),
    "an unknown pack layout": lambda d, v: d.update(pack_layout="../../victim"),
}


@pytest.mark.parametrize("fmt", ["json", "binary"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_manifest_is_refused_and_writes_nothing_outside(
    setup: tuple[Repository, Path, str, Path], case: str, fmt: str
) -> None:
    repo, root, cid, victim = setup
    rewrite(repo, root, cid, lambda d: CASES[case](d, victim), fmt)
    for attempt in (
        lambda: repo.materialize("web", cid, root / "out"),
        lambda: repo.verify("web", cid),
    ):
        with pytest.raises(CorruptCheckpoint):
            attempt()
        assert victim.read_text() == "precious"
        assert not (root / "sub").exists()
    assert repo.checkpoints("web") == []  # listed as nothing restorable, not a crash


def test_a_manifest_of_either_format_reads_back_the_same(
    setup: tuple[Repository, Path, str, Path],
) -> None:
    repo, root, cid, _ = setup
    path = root / "repo" / manifest_key("web", cid)
    assert path.read_bytes()[:8] == b"CKPTMAN2"  # what a commit writes now
    before = repo.read_manifest("web", cid)
    for fmt in ("json", "binary"):
        rewrite(repo, root, cid, lambda d: None, fmt)
        assert repo.read_manifest("web", cid) == before
        repo.materialize("web", cid, root / f"out-{fmt}")
        assert (root / f"out-{fmt}" / "core-1.img").read_bytes() == b"core" * 100


BINARY_CASES: dict[str, Callable[[bytes], bytes]] = {
    "cut in its header": lambda raw: raw[:20],
    "header length past the end": lambda raw: raw[:8] + struct.pack("<I", len(raw)) + raw[12:],
    "a digest short": lambda raw: raw[:-1],
    "bytes after the digests": lambda raw: raw + b"\0" * 32,
    "only the magic": lambda raw: raw[:8],
}


@pytest.mark.parametrize("case", sorted(BINARY_CASES))
def test_a_format_2_manifest_whose_lengths_do_not_add_up_is_refused(
    setup: tuple[Repository, Path, str, Path], case: str
) -> None:
    repo, root, cid, _ = setup
    path = root / "repo" / manifest_key("web", cid)
    path.chmod(0o600)
    path.write_bytes(BINARY_CASES[case](path.read_bytes()))
    repo._summaries.clear()
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        repo.read_manifest("web", cid)
    assert repo.checkpoints("web") == []


def test_oversized_objects_are_refused_unread(setup: tuple[Repository, Path, str, Path]) -> None:
    repo, root, cid, _ = setup
    pack_id = repo.packs_of("web", cid)[0]
    index = root / "repo" / index_key(pack_id, "web")
    index.chmod(0o600)
    with open(index, "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)  # sparse: nothing allocated on disk either
    with pytest.raises(CorruptCheckpoint, match="refused unread"):
        repo.materialize("web", cid, root / "out")


def test_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(ValueError):
        check_workload_name("web\n")
    assert not is_checkpoint_id("20261124T000000.000000Z-abcdef\n")
    assert is_checkpoint_id("20261124T000000.000000Z-abcdef")
