"""Triton helpers for the FP8 (e4m3) KV cache: quantise on store, shared by every store kernel.

The interpreter (CPU, Triton 3.9) casts float32 to e4m3 wrongly: its rounding adds to the
mantissa without carrying into the exponent (1.97 becomes 1.0, not 2.0). On CPU the value is
therefore first rounded onto the e4m3 grid in float32, where the cast is exact; on CUDA the
hardware conversion (round to nearest even) runs alone. Reading FP8 needs no helper: a load
then ``.to(float16/bfloat16/float32)`` is exact, and the scale folds into the softmax scale
(K) and the output (V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def emulate_fp8_cast(t: torch.Tensor) -> bool:
    """True where the kernel runs in the interpreter (CPU tensors), whose e4m3 cast is wrong."""
    return t.device.type != "cuda"


@triton.jit
def _round_to_e4m3_grid(y):
    """Float32 ``y`` (|y| <= 448) rounded to nearest-even onto the e4m3 values."""
    # Normal range: keep 3 mantissa bits of the float32, rounding on the 20 dropped ones.
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormal range (|y| < 2**-6): multiples of 2**-9, the float32 spacing at 2**14; the
    # sign goes back on as a bit, so that -0.0 stays -0.0 as in torch's cast.
    mag = tl.abs(y)
    sub = ((mag + 16384.0) - 16384.0).to(tl.int32, bitcast=True)
    sub = (sub | (y.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(mag < 0.015625, sub, normal)


@triton.jit
def quantize_fp8_e4m3(x, scale, EMULATE_CAST: tl.constexpr):
    """``x / scale`` saturated to +-448 and cast to e4m3 (``tl.float8e4nv``).

    ``scale`` is a float32 scalar (the layer's K or V scale, loaded once per program)."""
    y = tl.clamp(x.to(tl.float32) / scale, -448.0, 448.0)
    if EMULATE_CAST:
        y = _round_to_e4m3_grid(y)
    return y.to(tl.float8e4nv)
