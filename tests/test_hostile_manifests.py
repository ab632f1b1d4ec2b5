"""A repository is input from whoever can write it: crafted manifests, indexes and oversized
objects are refused as corrupt before anything is written outside the image folder or
allocated (a repository in clear, where nothing authenticates them)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storage import CorruptCheckpoint, Repository
from storage.backends import LocalBlobStore
from storage.keys import index_key, manifest_key
from storage.manifest import check_workload_name, is_checkpoint_id
from storage.packs import MAX_INDEX_BYTES


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
    repo: Repository, root: Path, cid: str, change: Callable[[dict[str, Any]], None]
) -> None:
    path = root / "repo" / manifest_key("web", cid)
    doc = json.loads(path.read_bytes())
    change(doc)
    path.chmod(0o600)
    path.write_text(json.dumps(doc))
    repo._summaries.clear()


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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_manifest_is_refused_and_writes_nothing_outside(
    setup: tuple[Repository, Path, str, Path], case: str
) -> None:
    repo, root, cid, victim = setup
    rewrite(repo, root, cid, lambda d: CASES[case](d, victim))
    for attempt in (
        lambda: repo.materialize("web", cid, root / "out"),
        lambda: repo.verify("web", cid),
    ):
        with pytest.raises(CorruptCheckpoint):
            attempt()
        assert victim.read_text() == "precious"
        assert not (root / "sub").exists()
    assert repo.checkpoints("web") == []  # listed as nothing restorable, not a crash


def test_oversized_objects_are_refused_unread(setup: tuple[Repository, Path, str, Path]) -> None:
    repo, root, cid, _ = setup
    pack_id = repo.packs_of("web", cid)[0]
    index = root / "repo" / index_key(pack_id)
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
