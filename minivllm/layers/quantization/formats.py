"""Block-scaled weight formats: quantise and dequantise ``[N, K]`` matrices.

One layout serves every mode: ``q`` holds the weight in the storage dtype (float8 e4m3 or int8,
same shape as the dense weight) and ``scale`` (float32) one multiplier per block of
``row_block x col_block`` elements, so ``w[n, k] ≈ q[n, k] * scale[n // row_block, k // col_block]``.

- per-output-channel (load-time quantisation): ``row_block=1, col_block=K`` → scale ``[N, 1]``;
- Qwen's published FP8 checkpoints: ``128 x 128`` blocks (``weight_scale_inv``, a multiplier
  despite its name);
- GGUF ``Q8_0``: ``1 x 32`` blocks.

The last block along either axis may be partial (``ceil`` division), as in the checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The scale of an all-zero block: any positive value dequantises its zeros to zeros; this one
# keeps ``w / scale`` finite.
_MIN_AMAX = 1e-12


@dataclass(frozen=True)
class QuantFormat:
    """A storage dtype and the largest magnitude its codes may take."""

    dtype: torch.dtype
    max_code: float

    @property
    def name(self) -> str:
        return "fp8" if self.dtype == torch.float8_e4m3fn else "int8"


FP8_E4M3 = QuantFormat(torch.float8_e4m3fn, float(torch.finfo(torch.float8_e4m3fn).max))  # 448
# Symmetric int8: -128 is left out so that the grid is symmetric around zero.
INT8 = QuantFormat(torch.int8, 127.0)


def scale_grid_shape(rows: int, cols: int, row_block: int, col_block: int) -> tuple[int, int]:
    """Shape of the scale tensor of a ``rows x cols`` weight."""
    return -(-rows // row_block), -(-cols // col_block)


def quantize_blockwise(w: torch.Tensor, fmt: QuantFormat, row_block: int,
                       col_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a dense ``[N, K]`` weight; returns ``(q [N, K], scale [nb_r, nb_c] float32)``.

    Each block's scale maps its largest magnitude onto the format's largest code (absmax
    scaling); values are rounded to nearest (float8: the cast's round-to-nearest-even).
    """
    rows, cols = w.shape
    nb_r, nb_c = scale_grid_shape(rows, cols, row_block, col_block)
    pad_r, pad_c = nb_r * row_block - rows, nb_c * col_block - cols
    # Zero padding to whole blocks changes no block's absmax; it is cut off again below.
    wf = torch.nn.functional.pad(w.float(), (0, pad_c, 0, pad_r)) if pad_r or pad_c else w.float()
    blocks = wf.view(nb_r, row_block, nb_c, col_block)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_(min=_MIN_AMAX)
    scale = amax / fmt.max_code
    scaled = (blocks / scale).clamp_(-fmt.max_code, fmt.max_code)
    if fmt.dtype == torch.int8:
        scaled = scaled.round_()
    q = scaled.to(fmt.dtype).view(nb_r * row_block, nb_c * col_block)
    if pad_r or pad_c:
        q = q[:rows, :cols].contiguous()
    return q, scale.view(nb_r, nb_c)


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, row_block: int, col_block: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` weight that ``(q, scale)`` stand for, in ``dtype``.

    The product is formed in float32 and rounded once, so a float32 result is exact.
    """
    rows, cols = q.shape
    row_scale = scale if row_block == 1 else scale.repeat_interleave(row_block, 0)[:rows]
    if scale.shape[1] == 1:  # per output channel: a broadcast, no expansion
        return (q.float() * row_scale).to(dtype)
    nb_c = scale.shape[1]
    if nb_c * col_block == cols:
        out = q.float().view(rows, nb_c, col_block) * row_scale[:, :, None]
        return out.view(rows, cols).to(dtype)
    return (q.float() * row_scale.repeat_interleave(col_block, 1)[:, :cols]).to(dtype)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row float8 quantisation of activations ``[M, K]`` → ``(q, scale [M, 1])``.

    Runs entirely on the device (no host sync), so it is safe inside a CUDA graph.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_E4M3.max_code
    q = (xf / scale).clamp(-FP8_E4M3.max_code, FP8_E4M3.max_code).to(FP8_E4M3.dtype)
    return q, scale
