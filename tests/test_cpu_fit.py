"""`checkpointer hosts` says which hosts can take which workloads, by CPU, without running
CRIU or downloading an image (checkpointer/criu/cpu/fit.py replays `criu cpuinfo check`).

Its judgement is tested against CRIU's own on images edited with `crit` (a feature of CRIU's
instruction mask, a feature outside it, an xsave component, the xsave size), and end to end
with two hosts in namespaces, one whose checkpoints claim a feature this CPU lacks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpointer.criu import Criu, cpuinfo_check, cpuinfo_dump
from checkpointer.criu.cpu.fit import INS_MASK, missing, parse, summary
from checkpointer.criu.cpu.info import CPUINFO_IMAGE, CpuInfo, feature_name, read_cpuinfo
from storage.backends import LocalBlobStore
from storage.crypto import Sealed
from storage.host_records import MAX_RECORD_BYTES, HostRecords, record_key
from tests.test_cpu_compat import CRIU, build_crit, counter_on_a_claiming_more, crit
from tests.test_fleet import until

Entry = dict[str, Any]


def _lacking(have: list[int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    found = next(((w, b) for w, b in candidates if not have[w] >> b & 1), None)
    if found is None:
        pytest.fail(
            f"this CPU has every candidate feature of {candidates}: add one it lacks",
            pytrace=False,
        )
    return found


def _set_outside_mask(e: Entry) -> str:
    """A feature this CPU lacks that CRIU's default check ignores (vmx, smx, svm...)."""
    word, bit = _lacking(e["capability"], [(4, 5), (4, 6), (6, 2), (4, 31), (1, 29)])
    assert not INS_MASK.get(word, 0) >> bit & 1
    e["capability"][word] |= 1 << bit
    return ""


def _set_in_mask(e: Entry) -> str:
    word, bit = _lacking(e["capability"], [(1, 31), (1, 30), (18, 2), (11, 1), (9, 16)])
    e["capability"][word] |= 1 << bit
    return feature_name(word, bit)


def _set_xstate(e: Entry) -> str:
    mask = int(e["xfeatures_mask"])
    bit = next(b for b in (9, 7, 6, 5, 3) if not mask >> b & 1)
    e["xfeatures_mask"] = mask | 1 << bit
    return "xstate:"


def _grow_xsave(e: Entry) -> str:
    e["xsave_size"] = int(e["xsave_size"]) + 64
    return "xsave size"


@pytest.mark.parametrize(
    "edit",
    [lambda e: "", _set_outside_mask, _set_in_mask, _set_xstate, _grow_xsave],
    ids=["unchanged", "outside-mask", "instruction", "xstate", "xsave-size"],
)
def test_the_judgement_agrees_with_criu_cpuinfo_check(
    workdir: Path, edit: Callable[[Entry], str]
) -> None:
    """For each edit of this CPU's real cpuinfo.img: CRIU accepts it exactly when `missing`
    is empty, and the name `missing` gives is the edited feature."""
    criu = Criu(CRIU, workdir / "failed")
    real = workdir / "real"
    real.mkdir()
    cpuinfo_dump(criu, real)
    tools = build_crit(workdir / "tools")
    decoded = workdir / "cpuinfo.json"
    crit(tools, "decode", "-i", str(real / CPUINFO_IMAGE), "-o", str(decoded))
    doc = json.loads(decoded.read_text())
    expected = edit(doc["entries"][0]["x86_entry"][0])
    decoded.write_text(json.dumps(doc))
    edited = workdir / "edited"
    edited.mkdir()
    crit(tools, "encode", "-i", str(decoded), "-o", str(edited / CPUINFO_IMAGE))

    verdict = cpuinfo_check(criu, edited)
    assert verdict is not None
    host = read_cpuinfo(real / CPUINFO_IMAGE)
    image = read_cpuinfo(edited / CPUINFO_IMAGE)
    lacks = missing(image, host)
    assert verdict.compatible == (not lacks), (verdict, lacks)
    assert bool(expected) == bool(lacks) and all(expected in m for m in lacks), lacks
    # What travels in metadata and host records judges the same, after a JSON round trip.
    again = parse(json.loads(json.dumps(summary(image))))
    assert again is not None and missing(again, host) == lacks


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"vendor": 1, "capability_ver": 2, "capability": [0] * 18, "model": ""},
        {"vendor": 1, "capability_ver": 3, "capability": [0] * 19, "model": ""},
        {"vendor": 1, "capability_ver": 2, "capability": [-1] + [0] * 18, "model": ""},
        {"vendor": 1, "capability_ver": 2, "capability": [True] + [0] * 18, "model": ""},
        {"vendor": 1, "capability_ver": 2, "capability": [0] * 19, "model": 5},
        {"vendor": "1", "capability_ver": 2, "capability": [0] * 19, "model": ""},
        {"vendor": 1, "capability_ver": 2, "capability": [0] * 19, "xsave_size": 1 << 40},
    ],
)
def test_a_summary_that_is_not_exactly_one_is_no_cpu(doc: object) -> None:
    assert parse(doc) is None


def test_hosts_names_the_workload_and_the_feature_a_host_lacks(workdir: Path) -> None:
    """A's CRIU claims a feature this CPU lacks (so do A's checkpoints and A's published
    CPU); B is this CPU. `hosts --json` on B says B cannot take `web`, naming the feature,
    and A can; the table says it in one line."""
    with counter_on_a_claiming_more(workdir, 18094, False, 2) as (a, b, feature, _):
        checkpoint = a.checkpoint("web")

        def rows() -> dict[str, Any]:
            return {r["host"]: r for r in b.json("hosts")}

        until(
            "both hosts listed with web on a",
            lambda: "web" in rows().get("a", {}).get("workloads", []) and "b" in rows(),
            30,
            b,
        )
        got = rows()
        assert got["a"]["cpu_known"] and got["b"]["cpu_known"], got
        assert got["a"]["cannot_take"] == [], got
        assert got["b"]["cannot_take"] == [
            {"workload": "web", "checkpoint": checkpoint, "missing": [feature]}
        ], got
        table = b.cli("hosts").stdout
        line = next(ln for ln in table.splitlines() if "web: lacks" in ln)
        assert feature in line, table


def test_host_records_are_written_on_change_only_and_hostile_ones_are_no_record(
    tmp_path: Path,
) -> None:
    """A record is rewritten only when it changes; one planted by a bucket writer (not
    sealed with the repository's key, naming another host, or too large) is no record."""
    store = LocalBlobStore(tmp_path / "bucket")
    records = HostRecords(store, Sealed(os.urandom(32)))
    assert records.publish("a", {"cpu": {"x": 1}})
    assert not records.publish("a", {"cpu": {"x": 1}})  # unchanged: no write
    assert records.publish("a", {"cpu": {"x": 2}})
    assert records.read(["a", "b"]) == {"a": {"cpu": {"x": 2}, "host": "a"}}
    store.put(record_key("b"), json.dumps({"host": "b", "cpu": {}}).encode())  # unsealed
    store.put(record_key("c"), records.codec.seal(record_key("c"), b'{"host": "a"}'))
    store.put(record_key("d"), b"x" * (MAX_RECORD_BYTES + 1))
    assert set(records.read(["a", "b", "c", "d", "../e"])) == {"a"}
    assert records.publish("d", {"cpu": {}})  # a planted one is replaced
    assert records.read(["d"]) == {"d": {"cpu": {}, "host": "d"}}


def test_an_old_image_is_judged_as_criu_judges_it() -> None:
    """A version-1 image (12 capability words) takes the host's words past its own, and an
    image without xsave fields is compared on its features alone (criu's img_to_cpuinfo)."""
    host = CpuInfo("host", tuple([1] * 19), 0b111, 832, 1, 2, 2560)
    v1 = CpuInfo("old", tuple([1] * 12), None, None, 1, 1, None)
    assert missing(v1, host) == ()
    lacking = CpuInfo("old", (1, 1 << 27, *[1] * 10), 0b1111, 832, 1, 1, None)
    assert missing(lacking, host) == ("xstate:bndregs", "rdtscp")
    assert missing(CpuInfo("x", tuple([1] * 19), None, None, 3, 2, None), host)  # vendor
    assert missing(CpuInfo("x", tuple([1] * 18), None, None, 1, 2, None), host)  # 18 words
