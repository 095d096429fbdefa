"""Triton GEMV (batch-1..4 decode matmul, optionally with SiLU-and-mul fused into its input)
against torch: ``F.linear`` on float64 copies of the same (rounded) inputs.

Tolerance: the kernel accumulates in float32 in a different order than any reference and
rounds the output once to the activation dtype, so the error is one output rounding (2**-11
relative in float16) plus float32 summation error (~K * 2**-24); the bound is relative to the
output's scale (|W| |x|), since single outputs can cancel to near zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivllm.kernels.gemv import MAX_ROWS, gemv
from minivllm.layers.linear import RowParallelLinear

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str | None):
    x64 = x.double()
    if act == "silu_and_mul":
        k = w.shape[1]
        # The kernel rounds silu(gate) and the product to the activation dtype, as torch does.
        gate = F.silu(x64[:, :k]).to(x.dtype).double()
        x64 = (gate * x64[:, k:]).to(x.dtype).double()
    return F.linear(x64, w.double(), None if b is None else b.double()), x64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [None, "silu_and_mul"])
def test_gemv_matches_linear(dtype, act, device, generator):
    # Shapes that are not multiples of the tiles exercise the masks in both dimensions.
    for m, n, k, with_bias in [(1, 70, 1100, True), (2, 33, 96, False), (MAX_ROWS, 130, 300, True)]:
        x = torch.randn(m, 2 * k if act else k, generator=generator).to(dtype).to(device)
        w = (torch.randn(n, k, generator=generator) / k ** 0.5).to(dtype).to(device)
        b = torch.randn(n, generator=generator).to(dtype).to(device) if with_bias else None
        out = gemv(x, w, b, act)
        ref, x_used = _reference(x, w, b, act)
        scale = F.linear(x_used.abs(), w.double().abs()) + (0 if b is None else b.double().abs())
        err = ((out.double() - ref).abs() / scale).max().item()
        assert out.shape == (m, n) and out.dtype == dtype
        assert err <= 2 * ULP[dtype] + k * 2.0 ** -24, (m, n, k, err)


def test_gemv_config_override_gives_same_result(device, generator):
    x = torch.randn(1, 600, generator=generator).to(device)
    w = torch.randn(50, 600, generator=generator).to(device)
    a, b = gemv(x, w), gemv(x, w, config=(2, 128, 2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_gemv_rejects_bad_inputs(device):
    w = torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.randn(MAX_ROWS + 1, 64, device=device), w)
    with pytest.raises(ValueError, match="columns"):
        gemv(torch.randn(1, 64, device=device), w, act="silu_and_mul")
    with pytest.raises(ValueError, match="act"):
        gemv(torch.randn(1, 64, device=device), w, act="gelu")


def test_row_parallel_input_act_is_silu_and_mul_then_matmul(generator):
    """The layer API the MLP uses: the fused input activation equals activation → matmul."""
    layer = RowParallelLinear(48, 16, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 48, generator=generator))
        layer.bias.copy_(torch.randn(16, generator=generator))
    x = torch.randn(3, 96, generator=generator)
    expected = F.linear(F.silu(x[:, :48]) * x[:, 48:], layer.weight, layer.bias)
    torch.testing.assert_close(layer(x, input_act="silu_and_mul"), expected)
    with pytest.raises(ValueError, match="input_act"):
        layer(x, input_act="relu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_gemv_matches_norm_then_linear(dtype, with_residual, device, generator):
    """The pre-norm folded into the matmul: same output as rms_norm → linear, and the new
    residual stream bit-identical to torch's ``x + residual``."""
    from minivllm.kernels.gemv import rms_norm_gemv
    from minivllm.layers.norm import rms_norm_torch

    for m, n, k in [(1, 70, 1100), (3, 33, 96)]:
        x = (3 * torch.randn(m, k, generator=generator)).to(dtype).to(device)
        res = torch.randn(m, k, generator=generator).to(dtype).to(device) if with_residual else None
        norm_w = (1 + 0.1 * torch.randn(k, generator=generator)).to(dtype).to(device)
        w = (torch.randn(n, k, generator=generator) / k ** 0.5).to(dtype).to(device)
        b = torch.randn(n, generator=generator).to(dtype).to(device)
        out, new_res = rms_norm_gemv(x, res, norm_w, 1e-6, w, b)
        stream = x if res is None else x + res
        assert torch.equal(new_res, stream)
        normed = rms_norm_torch(stream, norm_w, 1e-6)
        ref, x_used = _reference(normed, w, b, None)
        scale = F.linear(x_used.abs(), w.double().abs()) + b.double().abs()
        err = ((out.double() - ref).abs() / scale).max().item()
        # One more rounding than plain gemv: the normalised value may round the other way
        # when float32 sums of squares differ in order (one ulp of the input dtype).
        assert err <= 4 * ULP[dtype] + k * 2.0 ** -24, (m, n, k, err)


@pytest.mark.parametrize("wdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("act", [None, "silu_and_mul"])
def test_gemv_8bit_weight_with_row_scales(wdtype, act, device, generator):
    """Quantised per-output-channel weights: codes read in 8 bits, the row scale applied to
    the float32 row sum; equal to the matmul with the dequantised weight."""
    m, n, k = 1, 70, 1100
    x = torch.randn(m, 2 * k if act else k, generator=generator).to(torch.float16).to(device)
    if wdtype == torch.int8:
        codes = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    else:
        codes = torch.randn(n, k, generator=generator).mul(50).clamp(-448, 448).to(wdtype)
    scale = torch.rand(n, generator=generator).add(0.5).div(k)
    b = torch.randn(n, generator=generator).to(torch.float16)
    out = gemv(x, codes.to(device), b.to(device), act, scale=scale.to(device))
    dense = (codes.float() * scale[:, None]).to(device)
    ref, x_used = _reference(x, dense.to(torch.float16), b.to(device), act)
    ref = F.linear(x_used, dense.double(), b.double().to(device))
    bound = F.linear(x_used.abs(), dense.double().abs()) + b.double().abs().to(device)
    assert ((out.double() - ref).abs() / bound).max().item() <= 2 * ULP[torch.float16] + k * 2.0 ** -24
    with pytest.raises(ValueError, match="scale"):
        gemv(x, codes.to(device), act=act)
