"""Quantise → dequantise round trips within each format's own rounding error, and every matmul
path (Triton weight-only kernel in the interpreter, ``_scaled_mm`` on CPU, ``_weight_int8pack_mm``)
against the dequantised torch reference."""

from __future__ import annotations

import pytest
import torch

from minivllm.layers.quantization.formats import FP8_E4M3, INT8, dequantize_blockwise, per_token_fp8, quantize_blockwise

# (row_block, col_block): per-output-channel, Qwen FP8 blocks, GGUF Q8_0 blocks; with shapes
# that leave partial blocks at both edges.
LAYOUTS = [(1, 200), (128, 128), (1, 32)]
SHAPE = (136, 200)


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g) * 0.05
    w[3] = 0.0  # an all-zero row must survive (scale of an empty block)
    w[7, :40] *= 30  # outliers: one block's scale is far from its neighbours'
    return w


def _expanded_scale(scale, row_block, col_block, shape):
    return scale.repeat_interleave(row_block, 0)[:shape[0]].repeat_interleave(col_block, 1)[:, :shape[1]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_round_trip_within_half_an_e4m3_step(layout):
    w = _weight()
    q, scale = quantize_blockwise(w, FP8_E4M3, *layout)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    back = dequantize_blockwise(q, scale, *layout)
    s = _expanded_scale(scale, *layout, w.shape)
    # e4m3 has 3 mantissa bits: rounding moves a normal value by <= 2^-4 of itself; below
    # 2^-6 (subnormals) the step is 2^-9, so the absolute error is <= 2^-10 (in code units).
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    assert torch.equal(back[3], torch.zeros_like(back[3]))
    # The largest magnitude of each block maps to the largest code, so none is clipped.
    assert (q.float().abs().amax() == FP8_E4M3.max_code)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_round_trip_within_half_a_step(layout):
    w = _weight()
    q, scale = quantize_blockwise(w, INT8, *layout)
    assert q.dtype == torch.int8 and int(q.min()) >= -127
    back = dequantize_blockwise(q, scale, *layout)
    s = _expanded_scale(scale, *layout, w.shape)
    assert ((back - w).abs() <= s * 0.5 * (1 + 1e-5)).all()


def test_finer_blocks_are_no_less_accurate_than_per_channel():
    # What the 128x128 block layout buys over per-channel: the outlier block no longer
    # coarsens its whole row. A regression here would mean the block scales are misapplied.
    w = _weight()
    err = {}
    for layout in LAYOUTS:
        q, scale = quantize_blockwise(w, INT8, *layout)
        err[layout] = (dequantize_blockwise(q, scale, *layout) - w)[7].norm()
    assert err[(1, 32)] < err[(1, 200)]


# Rows pick the kernel's three launch configurations: split-K decode (<= 16), mid, prefill (> 64).
@pytest.mark.parametrize("fmt,layout,rows", [
    *[(fmt, layout, rows) for fmt in (FP8_E4M3, INT8) for layout in LAYOUTS for rows in (1, 20)],
    (FP8_E4M3, (128, 128), 70), (INT8, (1, 200), 70)])
def test_triton_weight_only_gemm_matches_dequantised_reference(fmt, layout, rows):
    from minivllm.kernels.quant_gemm import weight_quant_gemm

    w = _weight()
    q, scale = quantize_blockwise(w, fmt, *layout)
    ref_w = dequantize_blockwise(q, scale, *layout)
    x = torch.randn(rows, SHAPE[1], generator=torch.Generator().manual_seed(rows))
    out = weight_quant_gemm(x, q, scale, *layout)
    torch.testing.assert_close(out, x @ ref_w.t(), rtol=1e-5, atol=1e-5)
    out16 = weight_quant_gemm(x.half(), q, scale, *layout)
    torch.testing.assert_close(out16.float(), x.half().float() @ ref_w.t(), rtol=2e-3, atol=2e-3)


def test_weight_only_gemm_rejects_bad_scale_shapes():
    from minivllm.kernels.quant_gemm import weight_quant_gemm

    q, scale = quantize_blockwise(_weight(), INT8, 1, 32)
    with pytest.raises(ValueError, match="scale must be"):
        weight_quant_gemm(torch.randn(2, SHAPE[1]), q, scale[:, :3], 1, 32)
    with pytest.raises(ValueError, match="power of two"):
        weight_quant_gemm(torch.randn(2, SHAPE[1]), q, scale, 1, 24)


def test_scaled_mm_per_channel_on_cpu_matches_its_dequantised_operands():
    # torch._scaled_mm runs on CPU (torch >= 2.8): the real W8A8 path, not a stand-in.
    from minivllm.layers.quantization.fp8 import scaled_mm_per_channel

    w = _weight()
    q, scale = quantize_blockwise(w, FP8_E4M3, 1, SHAPE[1])
    x = torch.randn(9, SHAPE[1], generator=torch.Generator().manual_seed(1))
    xq, xs = per_token_fp8(x)
    ref = (xq.float() * xs) @ dequantize_blockwise(q, scale, 1, SHAPE[1]).t()
    torch.testing.assert_close(scaled_mm_per_channel(x, q, scale), ref, rtol=1e-5, atol=1e-5)
    # And the W8A8 product is a few percent from the dense one (two e4m3 roundings).
    dense = x @ w.t()
    assert (ref - dense).norm() / dense.norm() < 0.06


def test_per_token_activation_scales_are_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0], [0.0, 0.0, 0.0]])
    q, scale = per_token_fp8(x)
    assert torch.allclose(scale.view(-1)[:2], torch.tensor([2.0, 100.0]) / 448)
    assert torch.equal(q.float()[2], torch.zeros(3))
    assert (q.float().abs().amax(dim=1)[:2] == 448).all()


def test_split_k_decode_matches_dequantised_reference():
    # Few output tiles (N=64 on the interpreter's 4 stand-in SMs): K is split into float32
    # partials that are summed afterwards (GEMV and tensor-core kernels alike); the result must
    # not depend on that.
    from minivllm.kernels.quant_gemm import _launch_config, weight_quant_gemm

    n, k = 64, 512
    assert _launch_config(1, n, k, 128, False, torch.device("cpu"))[3] > 1
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    for fmt in (FP8_E4M3, INT8):
        q, scale = quantize_blockwise(w, fmt, 128, 128)
        # One row: the GEMV kernel (and, for comparison, the tensor-core one); three: the latter.
        for rows, kernel in ((1, "gemv"), (1, "dot"), (3, "auto")):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(4))
            ref = x @ dequantize_blockwise(q, scale, 128, 128).t()
            out = weight_quant_gemm(x, q, scale, 128, 128, kernel=kernel)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
