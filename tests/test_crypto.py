"""Sealed objects and repository keys (pure logic on a local folder: no root needed)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import blake3
import pytest

from storage.access_keys import AccessSecret, WrongKey
from storage.backends import LocalBlobStore
from storage.crypto import (
    SEGMENT,
    SEGMENTED_HEADER,
    Plain,
    Sealed,
    new_master,
)
from storage.errors import CorruptCheckpoint, StorageError
from storage.keyring import (
    RepositoryNotEncrypted,
    add_key,
    list_keys,
    open_repository_codec,
    remove_key,
)

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def test_sealed_objects_open_only_unchanged_under_their_own_name_and_key() -> None:
    codec = Sealed(new_master())
    blob = codec.seal("manifests/web/1.json", b"secret page")
    assert b"secret page" not in blob
    assert codec.open("manifests/web/1.json", blob) == b"secret page"
    flipped = bytearray(blob)
    flipped[-20] ^= 1
    with pytest.raises(CorruptCheckpoint, match="fails authentication"):
        codec.open("manifests/web/1.json", bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="fails authentication"):
        codec.open("manifests/web/2.json", blob)  # replayed under another id
    with pytest.raises(CorruptCheckpoint, match="fails authentication"):
        Sealed(new_master()).open("manifests/web/1.json", blob)  # another repository's key
    with pytest.raises(CorruptCheckpoint, match="not sealed"):
        codec.open("manifests/web/1.json", b'{"version": 1}')  # planted in clear


def test_an_object_sealed_in_pieces_opens_like_one_sealed_whole() -> None:
    codec = Sealed(new_master())
    name = "manifests/web/1.json"
    data = os.urandom(3 * 1024 * 1024 + 5)
    pieces = [data[:1], data[1:70_000], b"", data[70_000:]]  # uneven, one empty
    blob = b"".join(codec.seal_stream(name, pieces))
    assert len(blob) == len(codec.seal(name, data))
    assert codec.open(name, blob) == data
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(CorruptCheckpoint, match="fails authentication"):
        codec.open(name, bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="fails authentication"):
        codec.open(name, blob[:-1])  # cut short
    assert b"".join(Plain().seal_stream(name, pieces)) == data


def _sealed_pack(codec: Sealed, name: str, plain: bytes) -> bytes:
    # Pieces of uneven sizes, some larger than a segment: cut and joined as they come.
    cuts = [0, 1000, 1000 + 3 * SEGMENT + 7, len(plain)]
    pieces = [memoryview(plain)[a:b] for a, b in itertools.pairwise(cuts) if a < b]
    return b"".join(codec.seal_pack(name, pieces, len(plain)))


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 5 * SEGMENT + 77])
def test_a_pack_sealed_in_segments_opens_whole_and_a_segment_at_a_time(size: int) -> None:
    codec = Sealed(new_master())
    plain = os.urandom(size)
    blob = _sealed_pack(codec, "packs/ab/x.pack", plain)
    assert bytes(codec.open_pack("packs/ab/x.pack", blob)) == plain
    layout = codec.pack_layout("packs/ab/x.pack", blob[:SEGMENTED_HEADER], len(blob))
    assert layout is not None and layout.stored_size() == len(blob)
    got = b""
    for i in range(layout.segments()):
        at, length = layout.span(i)
        got += codec.open_segment("packs/ab/x.pack", layout, i, blob[at : at + length])
    assert got == plain


def test_a_segmented_pack_refuses_every_change_a_bucket_writer_could_make() -> None:
    """A flipped bit, two segments swapped, the last one cut or one added, a header that
    lies about the length, a segment of another pack, the pack under another name."""
    codec = Sealed(new_master())
    name = "packs/ab/x.pack"
    plain = os.urandom(3 * SEGMENT + 100)
    blob = _sealed_pack(codec, name, plain)
    layout = codec.pack_layout(name, blob[:SEGMENTED_HEADER], len(blob))
    assert layout is not None
    spans = [layout.span(i) for i in range(layout.segments())]
    (a0, n0), (a1, n1) = spans[0], spans[1]
    flipped = bytearray(blob)
    flipped[a1 + 10] ^= 1
    swapped = blob[:a0] + blob[a1 : a1 + n1] + blob[a0 : a0 + n0] + blob[a1 + n1 :]
    cut = blob[: spans[-1][0]]
    longer = blob + blob[spans[-1][0] :]
    lying = bytearray(blob)
    lying[SEGMENTED_HEADER - 8 : SEGMENTED_HEADER] = (2 * SEGMENT).to_bytes(8, "little")
    lying = lying[: layout.span(1)[0] + layout.span(1)[1]]  # as long as its lie says
    other = _sealed_pack(codec, "packs/cd/y.pack", os.urandom(len(plain)))
    spliced = blob[:a1] + other[a1 : a1 + n1] + blob[a1 + n1 :]
    for bad, at in [
        (bytes(flipped), name),
        (swapped, name),
        (cut, name),
        (longer, name),
        (bytes(lying), name),
        (spliced, name),
        (blob, "packs/cd/y.pack"),
    ]:
        with pytest.raises(CorruptCheckpoint):
            codec.open_pack(at, bad)
    with pytest.raises(CorruptCheckpoint):  # and one segment alone, flipped
        codec.open_segment(name, layout, 1, bytes(flipped[a1 : a1 + n1]))


def test_packs_sealed_whole_before_segments_still_open() -> None:
    codec = Sealed(new_master())
    plain = os.urandom(100_000)
    blob = b"".join(codec.seal_stream("packs/ab/x.pack", [plain]))
    assert codec.pack_layout("packs/ab/x.pack", blob[:SEGMENTED_HEADER], len(blob)) is None
    assert bytes(codec.open_pack("packs/ab/x.pack", blob)) == plain


def test_chunk_ids_are_keyed_per_repository() -> None:
    page = b"\x42" * 4096
    a, b = Sealed(new_master()), Sealed(new_master())
    assert a.chunk_id(page) == a.chunk_id(memoryview(page))
    assert a.chunk_id(page) != b.chunk_id(page)
    assert a.chunk_id(page) != blake3.blake3(page).digest()
    assert Plain().chunk_id(page) == blake3.blake3(page).digest()


def test_two_access_keys_open_one_repository_and_a_removed_one_no_longer_does(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    first = AccessSecret.generate()
    opened = open_repository_codec(store, first, "host-a")
    assert opened.codec.encrypted and opened.key_id
    sealed = opened.codec.seal("pins/web/x", b"pinned")

    second = AccessSecret.from_file_text(AccessSecret.generate().file_text(), "second.key")
    second_id = add_key(store, opened, second, "host-a")
    by_second = open_repository_codec(store, second, "host-b", create=False)
    assert by_second.key_id == second_id
    assert by_second.codec.open("pins/web/x", sealed) == b"pinned"
    assert {k["id"] for k in list_keys(store, opened)} == {opened.key_id, second_id}

    with pytest.raises(StorageError, match="this host opened"):
        remove_key(store, opened, opened.key_id)  # type: ignore[arg-type]
    remove_key(store, by_second, opened.key_id)  # type: ignore[arg-type]
    with pytest.raises(WrongKey, match="opens none"):
        open_repository_codec(store, first, "host-a")
    with pytest.raises(StorageError, match="last key"):
        remove_key(store, opened, second_id)


def test_wrong_missing_and_malformed_keys_are_one_clear_error(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    open_repository_codec(store, AccessSecret.generate(), "host-a")
    with pytest.raises(WrongKey, match="opens none"):
        open_repository_codec(store, AccessSecret.generate(), "host-a")
    with pytest.raises(WrongKey, match="no key is configured"):
        open_repository_codec(store, None, "host-a")
    with pytest.raises(WrongKey, match="does not hold a repository key"):
        AccessSecret.from_file_text("not base64!\n", "/etc/checkpointer/repository.key")
    passphrase = AccessSecret(b"correct horse", "passphrase")
    with pytest.raises(WrongKey):
        open_repository_codec(store, passphrase, "host-a")


def test_a_passphrase_opens_what_it_wrapped(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    opened = open_repository_codec(store, AccessSecret.generate(), "host-a")
    add_key(store, opened, AccessSecret(b"correct horse battery", "passphrase"), "host-a")
    again = open_repository_codec(store, AccessSecret(b"correct horse battery", "passphrase"), "h")
    assert again.master == opened.master


def test_a_key_never_reads_a_repository_stored_in_clear(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    store.put("manifests/web/20261124T000000.000000Z-abcdef.json", b"{}")
    with pytest.raises(RepositoryNotEncrypted, match="encryption: false"):
        open_repository_codec(store, AccessSecret.generate(), "host-a")
    assert isinstance(open_repository_codec(store, None, "host-a").codec, Plain)


def test_a_sealed_repository_round_trips_and_refuses_a_flipped_bit_in_a_pack(
    tmp_path: Path,
) -> None:
    import os

    from storage import Repository
    from storage.keys import pack_key

    repo = Repository(LocalBlobStore(tmp_path / "repo"), codec=Sealed(new_master()))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(9 * 1024 * 1024))  # several packs
    (src / "core-1.img").write_bytes(b"core" * 1000)
    m = repo.commit("web", src)
    assert len(m.packs) >= 2
    out = tmp_path / "out"
    repo.materialize("web", m.id, out)
    assert (out / "pages-1.img").read_bytes() == (src / "pages-1.img").read_bytes()
    raw = (tmp_path / "repo" / pack_key(m.packs[0], m.pack_home)).read_bytes()
    assert (src / "pages-1.img").read_bytes()[:4096] not in raw  # not in clear
    path = tmp_path / "repo" / pack_key(m.packs[0], m.pack_home)
    path.chmod(0o600)
    flipped = bytearray(raw)
    flipped[len(flipped) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="fails authentication"):
        repo.materialize("web", m.id, tmp_path / "again")
