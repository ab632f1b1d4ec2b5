"""Whether a host's CPU can take a checkpoint, judged without CRIU from two small summaries.

`checkpointer hosts` answers "which hosts can take which workloads" for the whole fleet at
once: it cannot run `criu cpuinfo check` on other hosts, nor download every checkpoint's
`cpuinfo.img`. So each checkpoint's metadata carries a summary of the CPU it was taken on and
each host publishes the summary of its own (checkpointer/engine/host_cpus.py), and `missing`
replays CRIU 4.2's default check (`cpu_validate_features` in criu/arch/x86/cpu.c, with
`--cpu-cap` at its default `fpu,ins`) on the two:

- the FPU bits fpu, fxsr, osxsave and xsaves of the image must be on the host;
- the image's xsave state components (`xfeatures_mask`) must be a subset of the host's, and
  the xsave frame sizes (`xsave_size`, `xsave_size_max`) must be equal;
- every instruction feature of CRIU's mask the image has must be on the host.

Summaries read back (from a manifest or another host's object) are hostile input: `parse`
accepts only the exact shape, bounded, and anything else is "unknown" (no judgement).
"""

from __future__ import annotations

from typing import Any

from checkpointer.criu.cpu.info import CpuInfo, feature_name, xstate_name

# CRIU's x86_ins_capability_mask (criu/arch/x86/cpu.c) as (word, bit) pairs, from compel's
# X86_FEATURE_* numbers (compel/arch/x86/src/lib/include/uapi/asm/cpu.h).
_INS_BITS = {
    0: (0, 4, 8, 11, 15, 19, 23, 24, 25, 26),
    1: (11, 22, 27, 30, 31),
    3: (16, 20),
    4: (0, 1, 3, 9, 13, 19, 20, 22, 23, 25, 26, 27, 28, 29, 30),
    6: (5, 6, 7, 8, 11, 16, 21),
    9: (0, 3, 4, 5, 8, 9, 11, 14, 16, 17, 18, 19, 23, 26, 27, 28, 29, 30, 31),
    10: (0, 1, 2),
    11: (1, 6, 8, 9, 10, 11, 12, 13, 14, 22),
    13: (0,),
    18: (2, 3),
}
INS_MASK = {word: sum(1 << b for b in bits) for word, bits in _INS_BITS.items()}
_FPU_BITS = ((0, 0), (0, 24), (4, 27), (10, 3))  # fpu, fxsr, osxsave, xsaves
_WORDS = {1: 12, 2: 19}  # capability_ver -> capability words (NCAPINTS_V1, NCAPINTS_V2)
_VENDORS = (1, 2)  # Intel, AMD: CRIU refuses any other
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
MAX_MODEL = 64


def summary(cpu: CpuInfo) -> dict[str, Any]:
    """The JSON-able summary of `cpu` that goes into a checkpoint's metadata and a host's
    published object (about 300 bytes)."""
    return {
        "vendor": cpu.vendor,
        "capability_ver": cpu.capability_ver,
        "capability": list(cpu.capability),
        "xfeatures_mask": cpu.xfeatures_mask,
        "xsave_size": cpu.xsave_size,
        "xsave_size_max": cpu.xsave_size_max,
        "model": cpu.model[:MAX_MODEL],
    }


def parse(doc: object) -> CpuInfo | None:
    """A summary read back, or None if it is not exactly one (hostile input: a wrong type,
    a word out of range, a count of words CRIU would refuse all give None)."""
    if not isinstance(doc, dict):
        return None
    ver, vendor, caps, model = (
        doc.get(k) for k in ("capability_ver", "vendor", "capability", "model")
    )
    if not (isinstance(ver, int) and _is_int(ver, _U32) and isinstance(vendor, int)):
        return None
    if not (_is_int(vendor, _U32) and isinstance(model, str) and isinstance(caps, list)):
        return None
    if len(caps) != _WORDS.get(ver, -1) or not all(_is_int(c, _U32) for c in caps):
        return None
    xf, size, size_max = (doc.get(k) for k in ("xfeatures_mask", "xsave_size", "xsave_size_max"))
    if not (_is_opt_int(xf, _U64) and _is_opt_int(size, _U32) and _is_opt_int(size_max, _U32)):
        return None
    return CpuInfo(model[:MAX_MODEL], tuple(caps), xf, size, vendor, ver, size_max)


def _is_int(v: object, top: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top


def _is_opt_int(v: object, top: int) -> bool:
    return v is None or _is_int(v, top)


def missing(image: CpuInfo, host: CpuInfo) -> tuple[str, ...]:
    """What `host` lacks to run a checkpoint taken on `image`'s CPU, by CRIU's default check
    (empty: CRIU accepts it). Every failing part is named, where CRIU stops at the first."""
    if image.vendor not in _VENDORS:
        return (f"a known CPU vendor (the image says {image.vendor})",)
    if len(image.capability) != _WORDS.get(image.capability_ver, -1):
        return (f"capability words of version {image.capability_ver}",)
    # CRIU fills the words a version-1 image lacks from the host's (img_to_cpuinfo).
    caps = list(image.capability) + list(host.capability[len(image.capability) :])
    have = list(host.capability) + [0] * (len(caps) - len(host.capability))
    out: list[str] = []
    for word, bit in _FPU_BITS:
        if caps[word] >> bit & 1 and not have[word] >> bit & 1:
            out.append(feature_name(word, bit))
    # Absent in the image: CRIU takes the host's own value (nothing to compare).
    xf = image.xfeatures_mask
    extra = 0 if xf is None else xf & ~(host.xfeatures_mask or 0)
    out += [xstate_name(b) for b in range(64) if extra >> b & 1]
    for name, img, here in (
        ("xsave size", image.xsave_size, host.xsave_size),
        ("xsave max size", image.xsave_size_max, host.xsave_size_max),
    ):
        if img is not None and img != here:
            out.append(f"{name} {img} (here {here})")
    for word, mask in INS_MASK.items():
        lacks = caps[word] & mask & ~have[word]
        out += [feature_name(word, b) for b in range(32) if lacks >> b & 1]
    return tuple(dict.fromkeys(out))  # fpu/fxsr are in both checks: once
