"""The results: medians and spreads, the table of every method, each target of the issue with
its verdict, and the files written (JSON with every figure, .md with the tables)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.methods.checkpointer import (
    CLEAR,
    CLEAR_KEPT,
    CLEAR_OLDER,
    KEPT,
    LOCAL,
    OLDER,
)

RESTIC = "restic local"


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _med(d: dict[str, Any], k: str) -> float | None:
    return float(d[k]["median"]) if k in d else None


def _fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    if unit == "B":
        return f"{v / 1e6:.1f} MB"
    if unit == "MB/s":
        return f"{v / 1e6:.0f} MB/s"
    return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"


def table(results: dict[str, Any]) -> str:
    rows = [
        "| workload | method | pause (frozen) first / steady | pause vs raw | trigger → "
        "durable first / steady | throughput first / steady (vs raw pass) | stored first / "
        "steady | stored after all | restore (vs raw) | peak RSS | CPU s |",
        "|" + "---|" * 11,
    ]
    for wname, methods in results["workloads"].items():
        raw = methods["raw criu (tmpfs)"]
        raw_pause = _med(raw, "frozen_steady") or 0.0
        raw_restore = _med(raw, "restore") or 0.0
        raw_pass = _med(methods.get("raw blake3+zstd pass", {}), "bytes_per_second") or 0.0
        for m, d in methods.items():
            if m == "floor":
                continue
            pause, rst = _med(d, "frozen_steady"), _med(d, "restore")
            rss = d.get("daemon_peak_rss_mb", d.get("peak_rss_mb", {})).get("max")
            cpu = _med(d, "cpu_seconds")
            tp = [_med(d, f"throughput_{p}") for p in ("first", "steady")]
            if m == "raw blake3+zstd pass":
                tp_text = f"{_fmt(_med(d, 'bytes_per_second'), 'MB/s')} (1 core)"
                if _med(d, "disk_bytes_per_second"):
                    tp_text += f"; disk write {_fmt(_med(d, 'disk_bytes_per_second'), 'MB/s')}"
            elif tp[0]:
                tp_text = " / ".join(
                    f"{_fmt(t, 'MB/s')} ({t / raw_pass:.2f})" if t and raw_pass else "-" for t in tp
                )
            else:
                tp_text = "-"
            rows.append(
                f"| {wname} | {m} | {_fmt(_med(d, 'frozen_first'))} / {_fmt(pause)} | "
                f"{f'{pause / raw_pause:.2f}' if pause and raw_pause else '-'} | "
                f"{_fmt(_med(d, 'wall_first'))} / {_fmt(_med(d, 'wall_steady'))} | {tp_text} | "
                f"{_fmt(_med(d, 'stored_first'), 'B')} / {_fmt(_med(d, 'stored_steady'), 'B')} | "
                f"{_fmt(_med(d, 'stored_after_all'), 'B')} | "
                f"{_fmt(rst)}{f' ({rst / raw_restore:.2f}x)' if rst and raw_restore else ''} | "
                f"{f'{rss:.0f} MB' if rss else '-'} | {f'{cpu:.2f}' if cpu else '-'} |"
            )
        floor = _med(methods.get("floor", {}), "changed_page_bytes")
        ck = _med(methods.get("checkpointer local", {}), "stored_steady")
        if floor and ck:
            rows.append(
                f"| {wname} | floor: pages changed between consecutive images | | | | | "
                f"{floor / 1e6:.1f} MB (checkpointer stores {ck / floor:.2f}x) | | | | |"
            )
    return "\n".join(rows)


def targets(results: dict[str, Any]) -> str:
    """Each target of the issue with its measured ratio, met or missed."""
    lines = ["| target | workload | measured | verdict |", "|---|---|---|---|"]

    def add(
        target: str, wname: str, value: float | None, limit: float, low: bool, fmt: str
    ) -> None:
        if value is None:
            return
        ok = value <= limit if low else value >= limit
        lines.append(f"| {target} | {wname} | {fmt.format(value)} | {'met' if ok else 'MISSED'} |")

    for wname, ms in results["workloads"].items():
        raw = ms["raw criu (tmpfs)"]
        raw_pass = _med(ms.get("raw blake3+zstd pass", {}), "bytes_per_second")
        disk_pass = _med(ms.get("raw blake3+zstd pass", {}), "disk_bytes_per_second")
        for label in ("checkpointer local", "checkpointer s3"):
            d = ms.get(label)
            if not d:
                continue
            # Judged on the 9 steady-state dumps: every dump is a full one, and the first of
            # each method is a single sample (0.3-6x raw in one run, whichever the method).
            p, rp = _med(d, "frozen_steady"), _med(raw, "frozen_steady")
            if p and rp:
                add("pause <= 1.05 x raw CRIU", f"{wname}, {label}", p / rp, 1.05, True, "{:.2f}")
            for phase in ("first", "steady"):
                t = _med(d, f"throughput_{phase}")
                if t and raw_pass and label == "checkpointer local":
                    add(
                        f"throughput >= 0.70 x raw pass ({phase})",
                        wname,
                        t / raw_pass,
                        0.70,
                        False,
                        "{:.2f}",
                    )
                    if disk_pass and phase == "first":
                        bound = "disk write" if disk_pass < raw_pass else "raw pass"
                        add(
                            f"throughput >= 0.70 x the lower of raw pass and disk write ({phase})",
                            f"{wname} (bound: {bound})",
                            t / min(raw_pass, disk_pass),
                            0.70,
                            False,
                            "{:.2f}",
                        )
        floor = _med(ms.get("floor", {}), "changed_page_bytes")
        ck = _med(ms.get("checkpointer local", {}), "stored_steady")
        if floor and ck:
            add("steady stored <= 1.25 x floor", wname, ck / floor, 1.25, True, "{:.2f}")
        rr = _med(raw, "restore")
        for label, what in (
            ("checkpointer local (kept image)", "restore newest, kept image"),
            (OLDER, "restore the previous checkpoint, newest kept"),
            ("checkpointer local", "restore rebuilt from the local repository"),
        ):
            r = _med(ms.get(label, {}), "restore")
            if r and rr:
                add(f"{what} <= 1.15 x raw", wname, r / rr, 1.15, True, "{:.2f}")
        if "1000MB" in wname:
            for label in ("checkpointer daemon local", "checkpointer daemon s3"):
                d = ms.get(label, {}).get("daemon_peak_rss_mb")
                if d:
                    add(
                        f"daemon peak RSS <= 150 MB ({label[20:]})",
                        wname,
                        d["max"],
                        150,
                        True,
                        "{:.0f} MB",
                    )
    for wname, ms in results["workloads"].items():
        lines.extend(_encryption_targets(wname, ms))
    lines.extend(restore_targets(RESULTS))
    scale = results.get("scheduler_at_scale")
    if scale:
        # A run that left no checkpoint in the log is missed too, whatever the log said.
        late = max(
            scale["missed"] + scale["skipped_overlap"],
            scale["expected_runs"] - scale["checkpoints"],
        )
        add(
            "scheduler: no missed or late run",
            f"{scale['workloads']} workloads",
            late,
            0,
            True,
            "{:.0f} missed/late",
        )
    return "\n".join(lines)


RESULTS = Path(__file__).resolve().parent / "results"


def restore_targets(folder: Path) -> list[str]:
    """The rows of the other benchmarks' targets, from their results beside ours (written by
    `make bench` after bench/run.py, which then renders this table again)."""
    out = []

    def row(target: str, what: str, value: float, ok: bool, fmt: str) -> None:
        out.append(f"| {target} | {what} | {fmt.format(value)} | {'met' if ok else 'MISSED'} |")

    speed = _load(folder / "restore_speed.json")
    if speed:
        what = f"redis-{speed['mb']}MB (bench.restore_speed)"
        for k, limit in speed.get("targets", {}).items():
            ratio = speed["ratio_to_raw"].get(k)
            if ratio is not None:
                row(f"{k} <= {limit} x raw CRIU restore", what, ratio, ratio <= limit, "{:.2f}")
    bucket = _load(folder / "bucket_download.json")
    if bucket:
        # Both endpoints when both were measured; a result from before the link row had one.
        measured = {"moto on loopback": bucket.get("loopback", bucket)}
        if "ratio" in bucket.get("link", {}):
            measured[f"moto behind a {bucket['link']['mbit']} Mbit/s link"] = bucket["link"]
        for where, m in measured.items():
            row(
                f"restore from the bucket >= {bucket['target']} x plain parallel GET",
                f"{bucket['mb']} MB image, {where} (bench.bucket_download)",
                m["ratio"],
                m["ratio"] >= bucket["target"],
                "{:.2f}",
            )
    incompressible = _load(folder / "incompressible.json")
    if incompressible:  # bench/run.py --sizes "" --pyarray 256 --out .../incompressible.json
        for wname, ms in incompressible["workloads"].items():
            d, yard = ms.get("checkpointer local", {}), ms.get("raw blake3+zstd pass", {})
            t = _med(d, "throughput_first")
            bounds = [b for b in (_med(yard, "bytes_per_second"),
                                  _med(yard, "disk_bytes_per_second")) if b]  # fmt: skip
            if t and bounds:
                row(
                    "first checkpoint >= 0.70 x the lower of raw pass and disk write",
                    f"{wname} (incompressible.json)",
                    t / min(bounds),
                    t / min(bounds) >= 0.70,
                    "{:.2f}",
                )
    big = _load(folder / "big_checkpoint.json")
    if big:
        peak = max(big["daemon_peak_rss_mb"].values())
        row(
            f"daemon peak RSS <= {big['target_mb']} MB",
            f"redis-{big['mb']}MB (bench.big_checkpoint)",
            peak,
            peak <= big["target_mb"],
            "{:.0f} MB",
        )
    return out


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _encryption_targets(wname: str, ms: dict[str, Any]) -> list[str]:
    """The encrypted repository against the same pipeline in clear, measured side by side in
    the same rounds: throughput >= 0.95 x clear, the restore rebuilt from the repository
    faster than in clear (whose restores still re-hash every chunk); restic beside."""
    enc, clear, restic = ms.get(LOCAL, {}), ms.get(CLEAR, {}), ms.get(RESTIC, {})
    out = []

    def row(target: str, value: float, ok: bool, detail: str) -> None:
        out.append(f"| {target} | {wname} | {value:.2f} ({detail}) | {'met' if ok else 'MISSED'} |")

    for p in ("first", "steady"):
        te, tc = _med(enc, f"throughput_{p}"), _med(clear, f"throughput_{p}")
        if te and tc:
            tr = _med(restic, f"throughput_{p}")
            detail = f"{_fmt(te, 'MB/s')} vs {_fmt(tc, 'MB/s')}; restic {_fmt(tr, 'MB/s')}"
            row(
                f"pipeline throughput encrypted / clear >= 0.95 ({p})",
                te / tc,
                te / tc >= 0.95,
                detail,
            )
    re, rc = _med(enc, "restore"), _med(clear, "restore")
    if re and rc:
        detail = f"{_fmt(re)} vs {_fmt(rc)}; restic {_fmt(_med(restic, 'restore'))}"
        row("restore rebuilt from repository: encrypted / clear < 1.0", re / rc, re < rc, detail)
    return out


def encryption(results: dict[str, Any]) -> str:
    """Encrypted (the default) beside clear and restic, per workload: the figures the
    encryption issue is about, with encrypted / clear ratios (pause and restores also
    against raw CRIU's)."""
    rows = [
        "| workload | figure | encrypted | clear | encrypted / clear | restic local |",
        "|---|---|---|---|---|---|",
    ]
    for wname, ms in results["workloads"].items():
        if LOCAL in ms and CLEAR in ms:
            rows += [f"| {wname} | {r} |" for r in _encryption_rows(ms)]
    return "\n".join(rows) if len(rows) > 2 else ""


def _encryption_rows(ms: dict[str, Any]) -> list[str]:
    raw = ms.get("raw criu (tmpfs)", {})
    rp, rr = _med(raw, "frozen_steady"), _med(raw, "restore")
    # figure, key, (encrypted, clear, restic) labels, unit, raw CRIU's figure to compare with
    specs: list[tuple[str, str, tuple[str, str, str | None], str, float | None]] = [
        ("throughput first", "throughput_first", (LOCAL, CLEAR, RESTIC), "MB/s", None),
        ("throughput steady", "throughput_steady", (LOCAL, CLEAR, RESTIC), "MB/s", None),
        ("trigger → durable first", "wall_first", (LOCAL, CLEAR, RESTIC), "s", None),
        ("trigger → durable steady", "wall_steady", (LOCAL, CLEAR, RESTIC), "s", None),
        ("pause steady", "frozen_steady", (LOCAL, CLEAR, RESTIC), "s", rp),
        ("stored first", "stored_first", (LOCAL, CLEAR, RESTIC), "B", None),
        ("stored steady", "stored_steady", (LOCAL, CLEAR, RESTIC), "B", None),
        ("stored after all", "stored_after_all", (LOCAL, CLEAR, RESTIC), "B", None),
        ("restore newest, kept image", "restore", (KEPT, CLEAR_KEPT, None), "s", rr),
        ("restore previous, newest kept", "restore", (OLDER, CLEAR_OLDER, None), "s", rr),
        ("restore rebuilt from repository", "restore", (LOCAL, CLEAR, RESTIC), "s", rr),
    ]
    out = []
    for figure, key, labels, unit, ref in specs:
        e, c, r = (_med(ms.get(lb, {}), key) if lb else None for lb in labels)
        cells = [_fmt(v, unit) + (f" ({v / ref:.2f}x raw)" if v and ref else "") for v in (e, c, r)]
        ratio = f"{e / c:.2f}" if e and c else "-"
        out.append(f"{figure} | {cells[0]} | {cells[1]} | {ratio} | {cells[2]}")
    return out


def render(results: dict[str, Any]) -> str:
    """The table, encrypted beside clear, then the targets."""
    parts = [table(results), encryption(results), targets(results)]
    return "\n\n".join(p for p in parts if p)


def write(results: dict[str, Any], out: Path, text: str) -> None:
    """The results as JSON at `out`, the tables next to it as .md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(text + "\n")
