"""Encryption and authentication of everything a repository stores.

A repository has one master key, made at random when the repository is created and never
stored in clear. Two keys are derived from it (BLAKE3's key derivation):

- the chunk-id key: a chunk's id is its keyed BLAKE3 hash, so equal pages still dedup, but
  whoever reads the bucket cannot test whether a page they know (a password, a key) is there;
- the object key: every object (pack, pack index, manifest, pin, repository config) is sealed
  with AES-256-GCM, its name in the repository as associated data. A sealed object cannot be
  read without the key, changed without failing its tag, or moved to another name (a manifest
  replayed under a new id, an old index put beside another pack) without failing its tag.

AES-GCM runs at 7-8 GB/s per core here and releases the GIL; a few tags per 4 MiB pack replace
the per-chunk BLAKE3 re-hash of restores (~0.8 s per GB in Python).

Packs are sealed in segments (format 2): a header (magic, format, a random nonce, the segment
size, the plaintext's length), then each 64 KiB segment of the plaintext sealed on its own,
with a nonce of its own (the header's, its last 32 bits XORed with the segment's number) and
the object's name, the whole header and the segment's number as associated data. A segment
cannot be moved within the pack or to another, the header not changed, the pack not cut or
lengthened (the header's length says how many segments there are) without failing a tag. A
restore still checks every segment; a lazy restore reads only the segments holding the pages
the tree asks for: 64 KiB read and opened for a page, not 4 MiB (measured 1.5 ms a random
page with the whole pack, ~0.05 ms with its segment). Format 1 packs (one tag over the whole
pack, written before) are still read.

The master key is stored only wrapped, by access keys: storage/access_keys.py.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import CorruptCheckpoint, StorageError

MAGIC = b"CKPTSEAL"  # 8 bytes, then the format byte, then the 12-byte nonce
_FORMAT = 1
_SEGMENTED = 2  # packs: see the module's docstring
SEGMENT = 64 * 1024
_LAYOUT = struct.Struct("<IQ")  # segment size, plaintext length (after MAGIC, format, nonce)
_NONCE = 12
_TAG = 16
HEADER = len(MAGIC) + 1 + _NONCE
OVERHEAD = HEADER + _TAG
SEGMENTED_HEADER = HEADER + _LAYOUT.size
_CHUNK_CONTEXT = "checkpointer 2026-11 chunk id"
_OBJECT_CONTEXT = "checkpointer 2026-11 object seal"


class Codec(Protocol):
    """How a repository names chunks and stores objects: in clear (legacy) or sealed.

    `authenticates`: every object read back through `open` is proven to be what a holder of
    the key wrote under that name, so a restore need not re-hash each chunk (the pack's tag
    covers its frames, the index's tag the digests and offsets)."""

    encrypted: bool
    authenticates: bool

    def chunk_id(self, chunk: bytes | memoryview) -> bytes: ...

    def chunk_ids(self, block: memoryview, chunk_size: int) -> bytes:
        """The ids of the consecutive chunks of `block`, concatenated."""
        ...

    def seal(self, name: str, data: bytes | bytearray) -> bytes | memoryview: ...

    def seal_stream(
        self, name: str, pieces: Iterable[bytes | memoryview]
    ) -> Iterator[bytes | memoryview]:
        """`seal` of the concatenation of `pieces`, the same object, yielded a piece at a
        time (BlobStore.put_pieces writes them as they come): a 4 GB image's manifest is
        43 MB, which `seal` holds twice, plaintext and sealed, at the commit's peak."""
        ...

    def open(self, name: str, blob: bytes) -> bytes: ...

    def open_pack(self, name: str, blob: bytes | memoryview) -> bytes | memoryview:
        """`open` into a buffer of this thread's, reused: valid until its next call here."""
        ...

    def seal_pack(
        self, name: str, pieces: Iterable[bytes | memoryview], size: int
    ) -> Iterator[bytes | memoryview]:
        """A pack of `size` bytes (the concatenation of `pieces`) as stored, a piece at a
        time; `open_pack` opens it whole, `pack_layout` and `open_segment` a part."""
        ...

    def pack_layout(self, name: str, head: bytes, blob_size: int) -> PackLayout | None:
        """How a stored pack is cut in segments, from its first SEGMENTED_HEADER bytes (or
        fewer, if it is that short); None if it can only be opened whole (format 1)."""
        ...

    def open_segment(self, name: str, layout: PackLayout, i: int, stored: bytes) -> bytes:
        """Segment `i`'s plaintext from its stored bytes (layout.span(i))."""
        ...


class Plain:
    """Repositories written before encryption: plain BLAKE3 ids, objects as they are.

    Only reachable without a configured key: a daemon that has a key never accepts a plain
    object (a planted plaintext manifest would otherwise be a downgrade)."""

    encrypted = False
    authenticates = False

    def chunk_id(self, chunk: bytes | memoryview) -> bytes:
        return blake3.blake3(chunk).digest()

    def chunk_ids(self, block: memoryview, chunk_size: int) -> bytes:
        return b"".join(
            [
                blake3.blake3(block[o : o + chunk_size]).digest()
                for o in range(0, len(block), chunk_size)
            ]
        )

    def seal(self, name: str, data: bytes | bytearray) -> bytes | memoryview:
        return data if isinstance(data, bytes) else memoryview(data)

    def seal_stream(
        self, name: str, pieces: Iterable[bytes | memoryview]
    ) -> Iterator[bytes | memoryview]:
        return iter(pieces)

    def seal_pack(
        self, name: str, pieces: Iterable[bytes | memoryview], size: int
    ) -> Iterator[bytes | memoryview]:
        return iter(pieces)

    def pack_layout(self, name: str, head: bytes, blob_size: int) -> PackLayout | None:
        _refuse_sealed(name, head)
        return PackLayout(0, SEGMENT, blob_size, 0, b"", b"")

    def open_segment(self, name: str, layout: PackLayout, i: int, stored: bytes) -> bytes:
        return stored

    def open_pack(self, name: str, blob: bytes | memoryview) -> bytes | memoryview:
        _refuse_sealed(name, blob)
        return blob

    def open(self, name: str, blob: bytes) -> bytes:
        _refuse_sealed(name, blob)
        return blob


def _refuse_sealed(name: str, blob: bytes | memoryview) -> None:
    if blob[: len(MAGIC)] == MAGIC:
        raise StorageError(
            f"{name} is encrypted and no repository key is configured: set "
            "storage.key_file (see docs/storage.md, Encryption)"
        )


class Sealed:
    """The codec of an encrypted repository (see the module's docstring)."""

    encrypted = True
    authenticates = True

    def __init__(self, master: bytes) -> None:
        if len(master) != 32:
            raise ValueError("a repository master key is 32 bytes")
        self._chunk_key = _derive(_CHUNK_CONTEXT, master)
        self._keyed = blake3.blake3(key=self._chunk_key)
        self._object_key = _derive(_OBJECT_CONTEXT, master)
        self._aead = AESGCM(self._object_key)
        # Packs are opened into buffers reused per thread: with the daemon's malloc tuning
        # every fresh 4 MiB buffer is a new zero-filled mapping, and faulting two of them in
        # per pack held sealing to ~0.6 GB/s; AES-GCM itself does 7 GB/s here. (Sealing
        # streams instead: seal_stream, in slices.)
        self._buffers = threading.local()

    def chunk_id(self, chunk: bytes | memoryview) -> bytes:
        return blake3.blake3(chunk, key=self._chunk_key).digest()

    def chunk_ids(self, block: memoryview, chunk_size: int) -> bytes:
        # A copy of one keyed hasher per chunk: measured a little faster than keying anew.
        keyed = self._keyed
        out = []
        for o in range(0, len(block), chunk_size):
            h = keyed.copy()
            h.update(block[o : o + chunk_size])
            out.append(h.digest())
        return b"".join(out)

    def seal(self, name: str, data: bytes | bytearray) -> bytes | memoryview:
        """One allocation of the sealed size (a manifest of a 1 GB image is 11 MB)."""
        nonce = secrets.token_bytes(_NONCE)
        out = bytearray(OVERHEAD + len(data))
        out[: len(MAGIC)] = MAGIC
        out[len(MAGIC)] = _FORMAT
        out[len(MAGIC) + 1 : HEADER] = nonce
        self._aead.encrypt_into(nonce, data, name.encode(), memoryview(out)[HEADER:])
        return memoryview(out)

    def seal_stream(
        self, name: str, pieces: Iterable[bytes | memoryview]
    ) -> Iterator[bytes | memoryview]:
        # The same bytes as AESGCM.encrypt over the joined pieces (GCM is a stream cipher
        # with one tag over the whole): `open` cannot tell the two apart.
        nonce = secrets.token_bytes(_NONCE)
        enc = Cipher(algorithms.AES(self._object_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(name.encode())
        yield MAGIC + bytes([_FORMAT]) + nonce
        for piece in pieces:
            yield enc.update(piece)
        enc.finalize()
        yield enc.tag

    def open(self, name: str, blob: bytes) -> bytes:
        nonce = self._check_header(name, blob)
        try:
            return self._aead.decrypt(nonce, memoryview(blob)[HEADER:], name.encode())
        except InvalidTag as e:
            raise _tampered(name) from e

    def open_pack(self, name: str, blob: bytes | memoryview) -> bytes | memoryview:
        if len(blob) > len(MAGIC) and blob[len(MAGIC)] == _SEGMENTED:
            return self._open_segmented(name, blob)
        nonce = self._check_header(name, blob)
        size = len(blob) - OVERHEAD
        view = memoryview(self._buffer("open", size))[:size]
        try:
            self._aead.decrypt_into(nonce, memoryview(blob)[HEADER:], name.encode(), view)
        except InvalidTag as e:
            raise _tampered(name) from e
        return view

    def seal_pack(
        self, name: str, pieces: Iterable[bytes | memoryview], size: int
    ) -> Iterator[bytes | memoryview]:
        nonce = secrets.token_bytes(_NONCE)
        header = MAGIC + bytes([_SEGMENTED]) + nonce + _LAYOUT.pack(SEGMENT, size)
        aad = name.encode() + header
        yield header
        pending = bytearray()
        number = done = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            done += len(view)
            while view:
                if not pending and len(view) >= SEGMENT:  # straight from the piece
                    segment, view = view[:SEGMENT], view[SEGMENT:]
                else:
                    take = SEGMENT - len(pending)
                    pending += view[:take]
                    view = view[take:]
                    if len(pending) < SEGMENT:
                        continue
                    segment = memoryview(pending)
                yield self._aead.encrypt(_segment_nonce(nonce, number), segment, _aad(aad, number))
                del segment
                pending.clear()
                number += 1
        if done != size:
            raise ValueError(f"{name}: {done} bytes of pack, not the {size} announced")
        if pending or number == 0:
            yield self._aead.encrypt(
                _segment_nonce(nonce, number), bytes(pending), _aad(aad, number)
            )

    def pack_layout(self, name: str, head: bytes, blob_size: int) -> PackLayout | None:
        if len(head) > len(MAGIC) and head[: len(MAGIC)] == MAGIC and head[len(MAGIC)] == _FORMAT:
            return None
        if (
            len(head) < SEGMENTED_HEADER
            or head[: len(MAGIC)] != MAGIC
            or head[len(MAGIC)] != _SEGMENTED
        ):
            self._check_header(name, head)  # raises: not sealed as this repository seals
            raise _tampered(name)
        header = bytes(head[:SEGMENTED_HEADER])
        segment, size = _LAYOUT.unpack_from(header, HEADER)
        layout = PackLayout(
            SEGMENTED_HEADER, segment, size, _TAG, header[len(MAGIC) + 1 : HEADER], header
        )
        if segment == 0 or blob_size != layout.stored_size():
            raise _tampered(name)  # cut, lengthened, or a header that lies
        return layout

    def open_segment(self, name: str, layout: PackLayout, i: int, stored: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                _segment_nonce(layout.nonce, i), stored, _aad(name.encode() + layout.header, i)
            )
        except InvalidTag as e:
            raise _tampered(name) from e

    def _open_segmented(self, name: str, blob: bytes | memoryview) -> memoryview:
        layout = self.pack_layout(name, bytes(blob[:SEGMENTED_HEADER]), len(blob))
        assert layout is not None
        out = memoryview(self._buffer("open", layout.size))[: layout.size]
        aad = name.encode() + layout.header
        src = memoryview(blob)
        try:
            for i in range(layout.segments()):
                at, length = layout.span(i)
                start = i * layout.segment
                self._aead.decrypt_into(
                    _segment_nonce(layout.nonce, i),
                    src[at : at + length],
                    _aad(aad, i),
                    out[start : start + length - _TAG],
                )
        except InvalidTag as e:
            raise _tampered(name) from e
        return out

    def _buffer(self, which: str, size: int) -> bytearray:
        buf: bytearray | None = getattr(self._buffers, which, None)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, 4 * 1024 * 1024 + 128 * 1024))
            setattr(self._buffers, which, buf)
        return buf

    def _check_header(self, name: str, blob: bytes | memoryview) -> bytes:
        if len(blob) < OVERHEAD or blob[: len(MAGIC)] != MAGIC or blob[len(MAGIC)] != _FORMAT:
            raise CorruptCheckpoint(
                f"{name} is not sealed with this repository's key format (planted, damaged, "
                "or written unencrypted): refused"
            )
        return bytes(blob[len(MAGIC) + 1 : HEADER])


@dataclass(frozen=True)
class PackLayout:
    """Where the segments of a stored pack lie: after `start` bytes of header, each
    `segment` bytes of plaintext plus `overhead` (a tag; none in clear), the last shorter."""

    start: int
    segment: int
    size: int  # of the plaintext
    overhead: int
    nonce: bytes
    header: bytes

    def segments(self) -> int:
        return max(1, -(-self.size // self.segment))

    def stored_size(self) -> int:
        return self.start + self.size + self.segments() * self.overhead

    def span(self, i: int) -> tuple[int, int]:
        """(offset, length) of segment `i` as stored."""
        plain = min(self.segment, self.size - i * self.segment)
        return self.start + i * (self.segment + self.overhead), plain + self.overhead


def _segment_nonce(nonce: bytes, number: int) -> bytes:
    return nonce[:8] + (int.from_bytes(nonce[8:], "big") ^ number).to_bytes(4, "big")


def _aad(prefix: bytes, number: int) -> bytes:
    return prefix + number.to_bytes(4, "little")


def _tampered(name: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"{name} fails authentication: it was changed, planted, moved from another name or "
        "written with another repository's key; refused"
    )


def _derive(context: str, key: bytes) -> bytes:
    return blake3.blake3(key, derive_key_context=context).digest()


def new_master() -> bytes:
    return os.urandom(32)
