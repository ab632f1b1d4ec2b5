"""Decoding a run of zstd frames into a buffer the caller owns, in one call without the GIL.

A restore decodes hundreds of thousands of 4 KiB frames. python-zstandard's batch decoder
(multi_decompress_to_buffer) allocates its output and sets each frame up on its own: measured
here at 0.6 GB/s on the benchmark's hex pages, against 1.15 GB/s for libzstd's
ZSTD_decompressDCtx over the same frames concatenated (it decodes every frame of its input,
one after the other) straight into a reused buffer. python-zstandard ships that libzstd API
through its cffi module (`zstandard._cffi`, the same library its own cffi backend calls);
cffi releases the GIL during the call, so two reader threads decode on two cores. Where that
module cannot be imported, the batch decoder is used instead, with the same results.

Either way a decoded run is only accepted if it is exactly the expected size; whether each
chunk landed where it belongs is the caller's check (the pack's AEAD tag, or each chunk's hash).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

try:
    from zstandard._cffi import ffi as _ffi
    from zstandard._cffi import lib as _lib
except ImportError:  # pragma: no cover - a zstandard without its cffi module
    _ffi = _lib = None


class FrameError(Exception):
    """The frames do not decode, or not to the size expected."""


class FrameDecoder:
    """Decodes runs of frames; one per thread (it holds a decoding context)."""

    def __init__(self, use_libzstd: bool = True) -> None:
        self._dctx: Any = None
        if use_libzstd and _lib is not None:
            self._dctx = _ffi.gc(_lib.ZSTD_createDCtx(), _lib.ZSTD_freeDCtx)
        else:
            self._fallback = zstandard.ZstdDecompressor()

    def decode_into(
        self,
        dst: bytearray,
        dst_offset: int,
        src: bytes | bytearray | memoryview,
        offsets: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        sizes: npt.NDArray[np.int64],
    ) -> None:
        """Decode the frames at `offsets`/`lengths` of `src` (adjacent: each starts where the
        one before ends) into `dst` from `dst_offset`, each frame `sizes` bytes, back to back."""
        start, end = int(offsets[0]), int(offsets[-1] + lengths[-1])
        expected = int(sizes.sum())
        if dst_offset + expected > len(dst) or end > len(src):
            raise FrameError("frames or their output lie outside the buffers")
        if self._dctx is not None:
            out = _ffi.from_buffer(dst, require_writable=True)
            n = _lib.ZSTD_decompressDCtx(
                self._dctx, out + dst_offset, expected, _ffi.from_buffer(src) + start, end - start
            )
            if _lib.ZSTD_isError(n):
                raise FrameError(_ffi.string(_lib.ZSTD_getErrorName(n)).decode())
            if n != expected:
                raise FrameError(f"frames decode to {n} bytes, not {expected}")
            return
        segments = np.empty((len(offsets), 2), dtype="<u8")
        segments[:, 0], segments[:, 1] = offsets, lengths
        try:
            decoded: Any = self._fallback.multi_decompress_to_buffer(
                zstandard.BufferWithSegments(src, segments.tobytes()),
                decompressed_sizes=sizes.astype("<u8").tobytes(),
                threads=1,
            )
        except (zstandard.ZstdError, ValueError) as err:  # ValueError: a damaged header
            raise FrameError(str(err)) from err
        joined = b"".join(decoded)
        if len(joined) != expected:
            raise FrameError(f"frames decode to {len(joined)} bytes, not {expected}")
        memoryview(dst)[dst_offset : dst_offset + expected] = joined
