"""The manifest's JSON, built into one buffer slice by slice (storage/manifest.py): the same
document as plain json.dumps would give, read back byte for byte, whatever the list sizes."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

import pytest

from storage.manifest import CHUNK_SIZE, DIGEST_SIZE, FileEntry, Manifest, new_checkpoint_id

pytestmark = pytest.mark.unit  # no root, no CRIU, no server: `make test-unit`


def test_chunk_lists_of_every_size_round_trip() -> None:
    # 0 chunks, one, and more than one encoding slice (with a remainder) for the big file.
    counts = {"empty.img": 0, "core-1.img": 1, "pages-1.img": 3 * 256 * 1024 // 32 * 3 + 7}
    files = [
        FileEntry(name, max(0, n * CHUNK_SIZE - 100), 0o600, os.urandom(n * DIGEST_SIZE))
        for name, n in counts.items()
    ]
    m = Manifest(
        id=new_checkpoint_id(),
        workload="web",
        created=datetime.now(UTC),
        chunk_size=CHUNK_SIZE,
        files=files,
        packs=["0" * 32],
        metadata={"note": "chunks"},
    )
    raw = bytes(m.to_json())
    doc = json.loads(raw)
    assert [base64.b64decode(f["chunks"]) for f in doc["files"]] == [f.digests for f in files]
    back = Manifest.parse(raw, "test")
    assert [bytes(f.digests) for f in back.files] == [f.digests for f in files]
    assert back.metadata == {"note": "chunks"} and back.packs == ["0" * 32]
