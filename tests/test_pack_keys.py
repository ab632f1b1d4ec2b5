"""Where packs live (storage/keys.py): under their workload's own prefix, or in the legacy flat
layout; keys read back from a listing are hostile input, parsed strictly, and a workload whose
name looks like the flat layout's fan-out is never confused with it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from storage import CorruptCheckpoint, Repository, keys
from storage.backends import LocalBlobStore
from storage.keys import FileType, ObjectName, index_key, pack_key, parse, wpacks_of
from storage.manifest import Manifest
from storage.packs import new_pack_id

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`

PID = "6a1b2c3d" + "0123456789abcdef012345ab"  # ends in "ab", like the workload below


def test_a_workloads_packs_are_under_its_own_prefix_and_the_legacy_ones_flat() -> None:
    assert pack_key(PID, "web") == f"wpacks/web/ab/{PID}.pack"
    assert index_key(PID, "web") == f"wpacks/web/ab/{PID}.idx"
    assert pack_key(PID, None) == f"packs/ab/{PID}.pack"
    assert index_key(PID, None) == f"packs/ab/{PID}.idx"
    assert wpacks_of("web") == "wpacks/web/"
    for home, workload in (("web", "web"), (None, "")):
        assert parse(pack_key(PID, home)) == ObjectName(FileType.PACK, PID, workload)
        assert parse(index_key(PID, home)) == ObjectName(FileType.INDEX, PID, workload)


def test_a_workload_named_like_a_fan_out_folder_is_never_confused_with_it(
    tmp_path: Path,
) -> None:
    """A workload named "ab" and the flat layout's folder "ab": each key parses as what it
    is, each listing prefix holds only its own keys, on a real folder store too."""
    scoped, flat = pack_key(PID, "ab"), pack_key(PID, None)
    assert parse(scoped) == ObjectName(FileType.PACK, PID, "ab")
    assert parse(flat) == ObjectName(FileType.PACK, PID, "")
    assert parse(f"packs/ab/ab/{PID}.pack") is None  # "ab" under the flat layout: not ours
    assert parse(f"wpacks/ab/{PID}.pack") is None  # no fan-out: not ours
    store = LocalBlobStore(tmp_path / "repo")
    other = new_pack_id()
    for key in (scoped, flat, pack_key(other, "ab2"), pack_key(other, "a")):
        store.put(key, b"x")
    assert sorted(store.list(keys.PACKS)) == [flat]  # the legacy pass never walks wpacks/
    assert sorted(store.list(wpacks_of("ab"))) == [scoped]  # nor "ab2"'s, nor "a"'s
    assert sorted(store.list(keys.WPACKS)) == sorted(
        [scoped, pack_key(other, "ab2"), pack_key(other, "a")]
    )


@pytest.mark.parametrize(
    "key",
    [
        f"wpacks/../ab/{PID}.pack",  # a path, not a workload
        f"wpacks/.hidden/ab/{PID}.pack",
        f"wpacks//ab/{PID}.pack",
        f"wpacks/web/cd/{PID}.pack",  # the fan-out must be the id's last two digits
        f"wpacks/web/AB/{PID}.pack",
        f"wpacks/web/ab/{PID.upper()}.pack",
        f"wpacks/web/ab/{PID}.pack.tmp",
        f"wpacks/web/ab/{PID}.json",
        f"wpacks/web/ab/{PID[:-3]}ab.pack",  # too short
        f"wpacks/web/ab/x/{PID}.pack",
        f"wpacks/web/ab/{PID}",
        f"wpacks/{'w' * 65}/ab/{PID}.pack",  # a workload name too long
        f"packs/web/ab/{PID}.pack",
        f"packs/ab/{PID}.pack/",
        "wpacks/web/ab/",
        "wpacks/",
    ],
)
def test_keys_that_are_not_ours_parse_as_nothing(key: str) -> None:
    assert parse(key) is None


def test_a_new_manifest_says_where_its_packs_are_and_an_unknown_layout_is_refused(
    tmp_path: Path,
) -> None:
    repo = Repository(LocalBlobStore(tmp_path / "repo"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(64 * 1024))
    m = repo.commit("web", src)
    assert m.pack_home == "web" and repo.read_manifest("web", m.id).pack_home == "web"
    stored = {p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*")}
    assert {pack_key(p, "web") for p in m.packs} <= stored
    assert not (tmp_path / "repo" / "packs").exists()
    raw = (tmp_path / "repo" / keys.manifest_key("web", m.id)).read_bytes()
    assert b'"pack_layout":"workload"' in raw and b'"version":3' in raw
    for layout in ("flat", "../../etc", 3):
        with pytest.raises(CorruptCheckpoint, match=r"pack layout .* upgrade checkpointer"):
            Manifest.parse(with_layout(raw, layout), "t")
    assert Manifest.parse(with_layout(raw, None), "t").pack_home is None  # as format 2 was
    with pytest.raises(ValueError, match="invalid workload name"):
        pack_key(PID, "../evil")


def with_layout(raw: bytes, layout: object) -> bytes:
    """A format 3 manifest (in clear) whose header says `pack_layout` is `layout` (None:
    says nothing)."""
    (n,) = struct.unpack_from("<I", raw, 8)
    doc = json.loads(raw[12 : 12 + n])
    doc.pop("pack_layout")
    if layout is not None:
        doc["pack_layout"] = layout
    header = json.dumps(doc).encode()
    return raw[:8] + struct.pack("<I", len(header)) + header + raw[12 + n :]
