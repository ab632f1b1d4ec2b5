"""Every kind of object a repository stores, and the one place that builds and parses its key.

restic's `FileType` is the model: a key spelled in several modules is several places to get
wrong, and a key read back from a listing is input from whoever can write the bucket, so it is
parsed strictly here (a name that does not parse is not ours and is ignored by listings).

Packs belong to the workload whose commits wrote them (docs/fleet.md, R3): its owner's garbage
collection lists `wpacks/<workload>/` alone, a page at a time, and nothing a host does walks
the packs of other hosts' workloads. The top-level prefix is not `packs/`: there a workload
named `ab` would share a folder with the two-hex-digit fan-out of the legacy layout, and the
legacy collection (which lists `packs/`) would walk every workload's packs. `<xx>` (the pack
id's last two hex digits, random) spreads one workload's keys over 256 prefixes: pack ids
begin with their creation time, and without it a workload's new keys would all sort together.
Where a pack lives is never guessed from a listing: the manifest that names it says so (and a
sealed manifest is authenticated), see `Manifest.pack_home`.

    config                              the sealed repository config (encrypted repositories)
    keys/<key id>                       the master key wrapped by one access key
    manifests/<workload>/<id>.json      a checkpoint: the commit point, written last
    wpacks/<workload>/<xx>/<id>.pack    chunks of the workload's commits, compressed (and sealed)
    wpacks/<workload>/<xx>/<id>.idx     the pack's index, written after its pack
    packs/<xx>/<pack id>.pack           legacy: the flat layout of repositories written before
    packs/<xx>/<pack id>.idx              packs belonged to a workload (read, collected, no more
                                          written)
    pins/<workload>/<id>                a checkpoint retention must keep
    marks/<workload>/<id>               what a restore drill found of a checkpoint
    leases/<workload>                   which host owns the workload (storage/leases.py)
    heads/<workload>                    which checkpoints exist, fleet mode (storage/heads.py)
    hosts/<host id>                     a host's heartbeat
    calls/<host id>                     the latest call to a host (storage/calls.py)
    hostinfo/<host id>                  what a host offers, its CPU (storage/host_records.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from storage.manifest import check_workload_name, is_checkpoint_id

_PACK_ID_RE = re.compile(r"[0-9a-f]{8}[0-9a-f]{24}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{8,32}")

CONFIG = "config"
MANIFESTS = "manifests/"
PACKS = "packs/"  # legacy flat layout
WPACKS = "wpacks/"
PINS = "pins/"
MARKS = "marks/"
KEYS = "keys/"
LEASES = "leases/"
HOSTS = "hosts/"
HEADS = "heads/"
CALLS = "calls/"
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class FileType(StrEnum):
    """The kinds of stored object."""

    CONFIG = "config"
    """The sealed repository config: proves a master key is this repository's."""
    KEY = "key"
    """The master key wrapped by one access key (restic's key files)."""
    MANIFEST = "manifest"
    """A checkpoint: its files as chunk lists, its packs, its metadata. Written last."""
    PACK = "pack"
    """Compressed chunks of one commit, one zstd frame each."""
    INDEX = "index"
    """Where each chunk of a pack lies; written after the pack, so it names a whole pack."""
    PIN = "pin"
    """A checkpoint that retention keeps whatever its rules say."""
    MARK = "mark"
    """What a restore drill found of a checkpoint: verified, or failed and why."""
    LEASE = "lease"
    """Which host owns a workload, replaced only with conditional writes."""
    HOST = "host"
    """A host's heartbeat: which hosts of the fleet are alive."""
    CALL = "call"
    """The latest call to a host: look at a workload's lease now (a migration)."""
    HEAD = "head"
    """Which checkpoints of a workload exist (its generation and chain), fleet mode."""


@dataclass(frozen=True)
class ObjectName:
    """A parsed key: its type and the names in it (workload and id, pack id or key id). A
    pack's or index's `workload` is the one whose prefix holds it, "" in the legacy layout."""

    type: FileType
    id: str = ""
    workload: str = ""


def manifest_key(workload: str, checkpoint_id: str) -> str:
    return f"{MANIFESTS}{workload}/{checkpoint_id}.json"


def manifests_of(workload: str) -> str:
    """The listing prefix of a workload's manifests."""
    return f"{MANIFESTS}{check_workload_name(workload)}/"


def pack_key(pack_id: str, home: str | None) -> str:
    """The key of a pack. `home`: the workload whose prefix holds it (what its manifest
    says: `Manifest.pack_home`), or None for the legacy flat layout."""
    return f"{_pack_folder(pack_id, home)}{pack_id}.pack"


def index_key(pack_id: str, home: str | None) -> str:
    """The key of a pack's index, beside its pack (see `pack_key`)."""
    return f"{_pack_folder(pack_id, home)}{pack_id}.idx"


def _pack_folder(pack_id: str, home: str | None) -> str:
    if home is None:
        return f"{PACKS}{pack_id[-2:]}/"
    return f"{WPACKS}{check_workload_name(home)}/{pack_id[-2:]}/"


def wpacks_of(workload: str) -> str:
    """The listing prefix of a workload's packs and indexes (its owner's GC lists this)."""
    return f"{WPACKS}{check_workload_name(workload)}/"


def pin_key(workload: str, checkpoint_id: str) -> str:
    return f"{PINS}{workload}/{checkpoint_id}"


def pins_of(workload: str) -> str:
    return f"{PINS}{check_workload_name(workload)}/"


def mark_key(workload: str, checkpoint_id: str) -> str:
    return f"{MARKS}{workload}/{checkpoint_id}"


def marks_of(workload: str) -> str:
    return f"{MARKS}{check_workload_name(workload)}/"


def key_key(key_id: str) -> str:
    return f"{KEYS}{key_id}"


def lease_key(workload: str) -> str:
    return f"{LEASES}{workload}"


def call_key(host_id: str) -> str:
    return f"{CALLS}{check_host_id(host_id)}"


def head_key(workload: str) -> str:
    return f"{HEADS}{workload}"


def host_key(host_id: str) -> str:
    return f"{HOSTS}{check_host_id(host_id)}"


def check_host_id(host_id: str) -> str:
    """Host ids become keys: the workload names' alphabet."""
    if not _HOST_RE.fullmatch(host_id):
        raise ValueError(
            f"invalid host id {host_id!r}: use 1-63 letters, digits, '_', '.', '-' (host.id)"
        )
    return host_id


def is_pack_id(text: str) -> bool:
    return bool(_PACK_ID_RE.fullmatch(text))


def parse(key: str) -> ObjectName | None:
    """The object a key names, or None if it is none of ours (never trust a listing)."""
    if key == CONFIG:
        return ObjectName(FileType.CONFIG)
    parts = key.split("/")
    if len(parts) == 2 and parts[0] + "/" == KEYS and _KEY_ID_RE.fullmatch(parts[1]):
        return ObjectName(FileType.KEY, parts[1])
    if len(parts) == 2 and parts[0] + "/" in (HOSTS, CALLS) and _HOST_RE.fullmatch(parts[1]):
        return ObjectName(FileType.HOST if parts[0] + "/" == HOSTS else FileType.CALL, parts[1])
    if len(parts) == 2 and parts[0] + "/" in (LEASES, HEADS):
        kind = FileType.LEASE if parts[0] + "/" == LEASES else FileType.HEAD
        try:
            return ObjectName(kind, workload=check_workload_name(parts[1]))
        except ValueError:
            return None
    if len(parts) == 4 and parts[0] + "/" == WPACKS:
        try:
            check_workload_name(parts[1])
        except ValueError:
            return None
        return _pack_name(parts[2], parts[3], parts[1])
    if len(parts) != 3:
        return None
    top, middle, name = parts[0] + "/", parts[1], parts[2]
    if top == PACKS:
        return _pack_name(middle, name, "")
    try:
        check_workload_name(middle)
    except ValueError:
        return None
    if top == MANIFESTS and name.endswith(".json") and is_checkpoint_id(name[: -len(".json")]):
        return ObjectName(FileType.MANIFEST, name[: -len(".json")], middle)
    if top == PINS and is_checkpoint_id(name):
        return ObjectName(FileType.PIN, name, middle)
    if top == MARKS and is_checkpoint_id(name):
        return ObjectName(FileType.MARK, name, middle)
    return None


def _pack_name(fan_out: str, name: str, workload: str) -> ObjectName | None:
    """A pack or index in folder `fan_out` (its id's last two hex digits, nothing else)."""
    stem, dot, ext = name.rpartition(".")
    if not (dot and is_pack_id(stem) and fan_out == stem[-2:]):
        return None
    if ext == "pack":
        return ObjectName(FileType.PACK, stem, workload)
    if ext == "idx":
        return ObjectName(FileType.INDEX, stem, workload)
    return None


def parse_as(key: str, kind: FileType) -> ObjectName | None:
    """`parse`, keeping only objects of one kind."""
    name = parse(key)
    return name if name is not None and name.type is kind else None
