"""The spool's queue: operations waiting for the remote store, in a folder that survives restarts.

One numbered file per operation ("P key" put, "D key" delete), written with fsync and renamed
into place, so a daemon killed at any instant finds every operation it had accepted. A pack
(or pack index) that reached the remote stays in the folder as `<n>.up` until the manifest
queued after it is uploaded too: until then another host may see it as unreferenced, and the
uploader must be able to check it is still there, and send it again from the local copy if it
is not, before the manifest that names it goes up (docs/fleet.md, R2).

Callers hold the spool's lock around every method; an in-memory mirror of what is pending
answers `exists` and `list` without reading the folder each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from pathlib import Path

from storage.keys import MANIFESTS, PACKS, WPACKS

Entry = tuple[Path, str, str]  # queue file, "P" (put) or "D" (delete), key
Entries = list[Entry]
Uploaded = list[tuple[Path, str, float]]  # `.up` file, key, when it reached the remote

log = logging.getLogger(__name__)

_UP = ".up"
_BAD = ".bad"  # a queue file that is no operation, set aside (see `entries`)
_OPS = ("P", "D", "R")
_ORPHAN_AGE = 3600.0  # an `.up` pack no queued manifest needs, this old: a failed commit's


def _seq(path: Path) -> int:
    return int(path.name.removesuffix(_UP).removesuffix(_BAD))


class SpoolQueue:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in [
            *folder.glob("*.tmp"),
            *folder.glob("needs-*.tmp"),
        ]:  # a write killed before its rename: never accepted
            stale.unlink(missing_ok=True)
        names = [
            p for p in folder.iterdir() if p.name.removesuffix(_UP).removesuffix(_BAD).isdigit()
        ]
        self._seq = max((_seq(p) for p in names), default=0)
        self._puts: Counter[str] = Counter()
        self._deletes: Counter[str] = Counter()
        self._records: Counter[str] = Counter()  # "R": applied after the uploads before them
        for _, op, key in self.entries():
            self._count(op)[key] += 1

    def add(self, op: str, key: str) -> None:
        self._seq += 1
        path = self.folder / f"{self._seq:016d}"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{op} {key}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._count(op)[key] += 1

    def entries(self) -> Entries:
        """The operations not yet done, oldest first. A file that is no operation is set
        aside (`_set_aside`), never returned: the uploader would die on it, or send garbage."""
        out = []
        for p in sorted(self.folder.iterdir()):
            if not p.name.isdigit():
                continue
            try:
                op, key = p.read_text().split(" ", 1)
            except FileNotFoundError:
                continue
            except ValueError:  # no space in it, or not UTF-8 (UnicodeDecodeError)
                op = key = ""
            if op not in _OPS or not key:
                self._set_aside(p)
                continue
            out.append((p, op, key))
        return out

    def _set_aside(self, path: Path) -> None:
        """A queue file that does not parse: a disk error, or a crash mid-write (the folder is
        local, but not beyond corruption). Renamed `<n>.bad` for a person to look at, so it is
        logged once and never read again; the blobs it may have named stay in the cache."""
        with contextlib.suppress(FileNotFoundError):
            head = path.read_bytes()[:80]
            path.rename(path.with_name(path.name + _BAD))
            log.error(
                "spool queue entry %s is not an operation (%r): set aside as %s%s, never "
                "uploaded; whatever it named is uploaded again by the next checkpoint",
                path,
                head,
                path.name,
                _BAD,
            )

    def pending_put(self, key: str) -> bool:
        return self._puts[key] > 0

    def pending_delete(self, key: str) -> bool:
        return self._deletes[key] > 0

    def pending_puts(self) -> set[str]:
        return {k for k, n in self._puts.items() if n > 0}

    def pending_deletes(self) -> set[str]:
        return {k for k, n in self._deletes.items() if n > 0}

    def remove(self, entry: Entry) -> None:
        """An operation that will never be done (discarded)."""
        path, op, key = entry
        path.unlink(missing_ok=True)
        self._forget(op, key)

    def set_needs(self, key: str, needed: list[str]) -> None:
        """The blob `key` (a manifest) names these keys (the packs its commit wrote)."""
        path = self._needs_path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join([key, *needed]))
        os.replace(tmp, path)

    def needs(self, key: str) -> set[str] | None:
        """What `set_needs` said of `key`; None if nothing was (an older spool's entry)."""
        try:
            first, *rest = self._needs_path(key).read_text().split("\n")
        except (FileNotFoundError, ValueError):
            return None
        return set(rest) if first == key else None

    def _needs_path(self, key: str) -> Path:
        return self.folder / f"needs-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    def done(self, batch: Entries) -> None:
        """The remote has these. Packs wait as `.up` for the manifest that needs them (all
        those queued before it, for a manifest whose needs are not known); once no manifest
        waits at all, `.up` entries older than an hour are let go (a failed commit's)."""
        for path, op, key in batch:
            if op == "P" and key.startswith(MANIFESTS):
                needed = self.needs(key)
                for up, up_key, _ in self.uploaded(before=_seq(path)):
                    if needed is None or up_key in needed:
                        up.unlink(missing_ok=True)
                self._needs_path(key).unlink(missing_ok=True)
            if op == "P" and key.startswith((WPACKS, PACKS)):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path, None)  # when it reached the remote
                    path.rename(path.with_name(path.name + _UP))
            else:
                path.unlink(missing_ok=True)
            self._forget(op, key)
        if not any(k.startswith(MANIFESTS) for k in self.pending_puts()):
            for up, _, _ in older_than(self.uploaded(), _ORPHAN_AGE):
                up.unlink(missing_ok=True)

    def uploaded(self, before: int | None = None) -> Uploaded:
        """Packs on the remote whose manifest is not, oldest first (queued before `before`)."""
        out: Uploaded = []
        for p in sorted(self.folder.glob(f"*{_UP}")):
            if before is not None and _seq(p) >= before:
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                _, key = p.read_text().split(" ", 1)
                out.append((p, key, p.stat().st_mtime))
        return out

    def seq_of(self, entry: Entry) -> int:
        return _seq(entry[0])

    def _count(self, op: str) -> Counter[str]:
        return {"P": self._puts, "D": self._deletes}.get(op, self._records)

    def _forget(self, op: str, key: str) -> None:
        counts = self._count(op)
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]


def older_than(uploaded: Uploaded, age: float) -> Uploaded:
    cutoff = time.time() - age
    return [u for u in uploaded if u[2] < cutoff]
