"""The CPU a checkpoint was taken on, and whether this host's CPU can run it.

A restored tree goes on executing the instructions it chose on the CPU it was started on
(glibc picks AVX-512 or SSE code paths once, at start); on a CPU that lacks them it dies of
SIGILL, or CRIU refuses the image, during the outage the restore was meant to end. So every
checkpoint carries `cpuinfo.img` (`criu cpuinfo dump`: vendor, feature words, xsave layout), and
a host checks it with `criu cpuinfo check` before the workload is stopped or given up
elsewhere. CRIU's check uses its default capabilities (the FPU/xsave state and the instruction
features it knows user code depends on) and says only *that* they differ, so on a mismatch the
missing features are named here, from both images' feature words.
"""

from __future__ import annotations

import functools
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from checkpointer.criu.driver import Criu
from checkpointer.criu.failures import CriuError, CriuFailure
from checkpointer.criu.images.pagemap import read_varint
from checkpointer.host import children

CPUINFO_IMAGE = "cpuinfo.img"
_CHECK_TIMEOUT = 60.0

# x86 feature names by capability word (compel's cpu.h, named as /proc/cpuinfo names them;
# "-" is a bit CRIU does not name). Words of real CPUID leaves, and of Linux's synthetic words
# (3, 7, 8) only the two CRIU's instruction check compares (compel sets them itself).
_NAMES = {
    0: "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 pn clflush - "
    "ds acpi mmx fxsr sse sse2 selfsnoop ht acc ia64 pbe",
    1: "- - - - - - - - - - - syscall - - - - - - - mp nx - mmxext - - fxsr_opt gbpages rdtscp - "
    "lm 3dnowext 3dnow",
    3: "- - - - - - - - - - - - - - - - rep_good - - - nopl",
    4: "xmm3 pclmulqdq dtes64 mwait dscpl vmx smx est tm2 ssse3 cid sdbg fma cx16 xtpr pdcm - "
    "pcid dca xmm4_1 xmm4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave osxsave avx f16c "
    "rdrand hypervisor",
    6: "lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs "
    "xop skinit wdt - lwp fma4 tce - nodeid_msr - tbm topoext perfctr_core perfctr_nb - bpext "
    "ptsc perfctr_llc mwaitx",
    9: "fsgsbase tsc_adjust - bmi1 hle avx2 - smep bmi2 erms invpcid rtm cqm - mpx rdt_a avx512f "
    "avx512dq rdseed adx smap avx512ifma - clflushopt clwb intel_pt avx512pf avx512er avx512cd "
    "sha_ni avx512bw avx512vl",
    10: "xsaveopt xsavec xgetbv1 xsaves",
    11: "prefetchwt1 avx512vbmi umip pku ospke - avx512_vbmi2 shstk gfni vaes vpclmulqdq "
    "avx512_vnni avx512_bitalg tme avx512_vpopcntdq - la57 - - - - - rdpid - - cldemote",
    13: "clzero irperf xsaveerptr",
    18: "- - avx512_4vnniw avx512_4fmaps",
}
_XSTATE = (
    "x87",
    "sse",
    "avx",
    "bndregs",
    "bndcsr",
    "opmask",
    "zmm_hi256",
    "hi16_zmm",
    "pt",
    "pkru",
)


@dataclass(frozen=True)
class CpuInfo:
    """What `cpuinfo.img` says of one CPU (cpuinfo_x86_entry in CRIU's images/cpuinfo.proto).
    `vendor`: 1 Intel, 2 AMD; `capability_ver`: 1 (12 words) or 2 (19 words); the xsave
    fields are None where the image has none (CRIU then compares the host with itself)."""

    model: str
    capability: tuple[int, ...]
    xfeatures_mask: int | None
    xsave_size: int | None
    vendor: int = 0
    capability_ver: int = 0
    xsave_size_max: int | None = None

    def features(self) -> set[str]:
        """The named features this CPU has."""
        out: set[str] = set()
        for word, names in _NAMES.items():
            bits = self.capability[word] if word < len(self.capability) else 0
            out.update(n for i, n in enumerate(names.split()) if n != "-" and bits >> i & 1)
        mask = self.xfeatures_mask or 0
        out.update(f"xstate:{n}" for i, n in enumerate(_XSTATE) if mask >> i & 1)
        return out


def feature_name(word: int, bit: int) -> str:
    """The name of capability bit `bit` of word `word`, or `word W bit B` if unnamed."""
    names = _NAMES.get(word, "").split()
    return names[bit] if bit < len(names) and names[bit] != "-" else f"word {word} bit {bit}"


def xstate_name(bit: int) -> str:
    """The name of xsave state component `bit` (xfeatures_mask), as `features` names it."""
    return f"xstate:{_XSTATE[bit]}" if bit < len(_XSTATE) else f"xstate:{bit}"


@dataclass(frozen=True)
class CpuCheck:
    """CRIU's verdict on an image's CPU here; `missing`: features the image's CPU has and
    this one lacks (may be empty when only the xsave layout differs); `criu_says`: its line."""

    compatible: bool
    missing: tuple[str, ...] = ()
    criu_says: str = ""

    def summary(self) -> str:
        """The missing features, short enough for one line."""
        shown = ", ".join(self.missing[:8]) + (
            f" and {len(self.missing) - 8} more" if len(self.missing) > 8 else ""
        )
        return f"lacks {shown}" if shown else f"differs ({self.criu_says})"


class CpuMismatch(CriuError):
    """This host's CPU cannot run a checkpoint: the workload must not move here."""

    def __init__(self, message: str) -> None:
        super().__init__(message, CriuFailure.CPU_MISMATCH)


def read_cpuinfo(path: Path) -> CpuInfo:
    """Decode `cpuinfo.img`: two magic numbers, a length, a protobuf cpuinfo_entry whose
    field 1 is the x86 entry. `capability` is a repeated uint32 (packed or not), which the
    stats decoder's one-value-per-field reading would lose."""
    raw = path.read_bytes()
    (size,) = struct.unpack_from("<I", raw, 8)
    entry = _fields(raw[12 : 12 + size])
    x86 = entry.get(1)
    if not x86 or not isinstance(x86[0], bytes):
        raise ValueError(f"{path} holds no x86 CPU entry")
    f = _fields(x86[0])
    caps: list[int] = []
    for v in f.get(6, []):
        if isinstance(v, int):
            caps.append(v)
        else:  # packed
            pos = 0
            while pos < len(v):
                n, pos = read_varint(v, pos)
                caps.append(n)
    model = f.get(7, [b""])[0]
    return CpuInfo(
        model=model.decode(errors="replace") if isinstance(model, bytes) else "",
        capability=tuple(caps),
        xfeatures_mask=_one_int(f, 8),
        xsave_size=_one_int(f, 9),
        vendor=_one_int(f, 1) or 0,
        capability_ver=_one_int(f, 5) or 0,
        xsave_size_max=_one_int(f, 10),
    )


def _one_int(f: dict[int, list[int | bytes]], field: int) -> int | None:
    """The field's last value (protobuf: the last one wins), None if absent."""
    v = f.get(field, [None])[-1]
    return v if isinstance(v, int) else None


def _fields(buf: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        out.setdefault(field, []).append(value)
    return out


def cpuinfo_dump(criu: Criu, images: Path) -> None:
    """Write this CPU's `cpuinfo.img` into `images` (6 ms here: taken with every checkpoint,
    after the dump, so the tree's pause does not include it)."""
    log = images.parent / f"{images.name}.cpuinfo.log"
    cmd = [criu.exe(), "cpuinfo", "dump", "--images-dir", str(images), "--log-file", str(log)]
    criu.run_logged(cmd, log, images.name, "cpuinfo-dump")
    log.unlink(missing_ok=True)


def here(criu: Criu) -> CpuInfo:
    """This host's CPU as this host's CRIU records it (`criu cpuinfo dump`)."""
    return _here(criu.binary)


@functools.lru_cache(maxsize=4)
def _here(binary: str) -> CpuInfo:
    """This host's CPU as CRIU sees it (it does not change while the daemon runs)."""
    with tempfile.TemporaryDirectory(prefix="cpuinfo-") as tmp:
        images = Path(tmp) / "here"
        images.mkdir()
        cpuinfo_dump(Criu(binary, Path(tmp) / "failed"), images)
        return read_cpuinfo(images / CPUINFO_IMAGE)


def cpuinfo_check(criu: Criu, images: Path) -> CpuCheck | None:
    """`criu cpuinfo check` of the image folder's `cpuinfo.img` on this host; None if the
    checkpoint records no CPU (taken by an older version: nothing to check against)."""
    recorded = images / CPUINFO_IMAGE
    if not recorded.is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="cpuinfo-") as tmp:
        log = Path(tmp) / "check.log"
        cmd = [criu.exe(), "cpuinfo", "check", "--images-dir", str(images), "--log-file", str(log)]
        out = children.run(cmd, timeout=_CHECK_TIMEOUT, capture_output=True)
        if out.returncode == 0:
            return CpuCheck(True)
        text = log.read_text(errors="replace") if log.exists() else out.stderr
    said = [ln.split(": ", 1)[-1].strip() for ln in text.splitlines() if "Error" in ln]
    try:
        missing = read_cpuinfo(recorded).features() - _here(criu.binary).features()
    except (OSError, ValueError, struct.error, CriuError):
        missing = set()
    return CpuCheck(False, tuple(sorted(missing)), said[0] if said else "CRIU refused the image")
