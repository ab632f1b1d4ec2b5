"""Move a built virtualenv's idea of where it lives, so that one build serves every install.

A venv names its own folder in a few text files: the shebang of every script in bin/, the
activate scripts and pyvenv.cfg. `make install` and `make deb` copy one cached build (built
once in BUILDDIR) to wherever it goes (PREFIX, or a package's staging tree) and rewrite those
names here, then fix the RECORD hashes of the files rewritten, so that `pip` in the installed
venv still uninstalls and verifies them. Nothing under lib/ names the folder once
direct_url.json (pip's record of the temporary source folder) is dropped at build time.

    python3 relocate_venv.py VENV OLD NEW     # VENV's files say OLD: make them say NEW
    python3 relocate_venv.py --clean VENV     # after a build: drop direct_url.json
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
from pathlib import Path


def _records(venv: Path) -> list[Path]:
    return sorted(venv.glob("lib/python3*/site-packages/*.dist-info/RECORD"))


def _digest(data: bytes) -> str:
    raw = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _rewrite_record(record: Path, fix: dict[Path, bytes | None]) -> None:
    """Rows of files in `fix` get the new content's hash and size (None: the row goes)."""
    site = record.parent.parent
    rows = list(csv.reader(io.StringIO(record.read_text())))
    out = []
    for row in rows:
        if not row:
            continue
        path = (site / row[0]).resolve()
        if path in fix:
            data = fix[path]
            if data is None:
                continue
            row = [row[0], _digest(data), str(len(data))]
        out.append(row)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(out)
    record.write_text(buf.getvalue())


def relocate(venv: Path, old: str, new: str) -> None:
    changed: dict[Path, bytes | None] = {}
    candidates = [venv / "pyvenv.cfg", *sorted(p for p in (venv / "bin").iterdir())]
    for path in candidates:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096] or old.encode() not in data:
            continue  # binaries (none expected) and files that do not name the folder
        data = data.replace(old.encode(), new.encode())
        path.write_bytes(data)
        changed[path.resolve()] = data
    for record in _records(venv):
        _rewrite_record(record, changed)


def clean(venv: Path) -> None:
    """pip's direct_url.json names the temporary folder the package was built from: a
    difference between two builds of the same source, and a path that no longer exists."""
    for record in _records(venv):
        direct = record.parent / "direct_url.json"
        if direct.exists():
            direct.unlink()
            _rewrite_record(record, {direct.resolve(): None})


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--clean":
        clean(Path(argv[1]))
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    relocate(Path(argv[0]), argv[1].rstrip("/"), argv[2].rstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
