"""The GEMV dispatch point (minivllm.layers.gemv_dispatch) on a machine without the CUDA op,
as CI runs it: the Triton kernel computes (in the interpreter), the CUDA op is asked only
where it is enabled and accepts the operands, and bad input raises ValueError either way.
The CUDA op's own numerics are tested on the GPU (tests/gpu/test_cuda_gemv.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivllm.csrc_ops import cuda_gemv
from minivllm.layers import gemv_dispatch
from minivllm.layers.norm import rms_norm_torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dispatch")


@pytest.fixture
def no_cuda_op(monkeypatch):
    """The CUDA op must not be called: it is unavailable here."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA op was called")

    monkeypatch.setattr(cuda_gemv, "gemv", refuse)
    monkeypatch.setattr(cuda_gemv, "rms_norm_gemv", refuse)


def _operands(m: int = 1, n: int = 24, k: int = 64, dtype=torch.float16):
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    return x, w, gen


def test_triton_when_the_cuda_op_is_off(no_cuda_op):
    assert gemv_dispatch.implementation() == gemv_dispatch.TRITON
    assert gemv_dispatch.prepare(torch.device("cpu")) == gemv_dispatch.TRITON
    x, w, gen = _operands(m=2)
    b = torch.randn(24, generator=gen).half()
    out = gemv_dispatch.gemv(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -9, atol=2 ** -9)


def test_enabled_but_unsupported_operands_take_triton(monkeypatch, no_cuda_op):
    """Enabled, but the operands are on the CPU (as they would be unaligned, too wide, ...):
    the CUDA op declines and the Triton kernel runs, silu_and_mul and the fused norm included."""
    monkeypatch.setattr(cuda_gemv, "enabled", lambda: True)
    x, w, gen = _operands(k=32)
    xx = torch.randn(1, 64, generator=gen).half()
    out = gemv_dispatch.gemv(xx, w[:, :32], act="silu_and_mul")
    act = (F.silu(xx[:, :32].float()).half() * xx[:, 32:]).double()
    torch.testing.assert_close(out.double(), act @ w[:, :32].double().t(), rtol=2 ** -8, atol=2 ** -8)
    res, nw = torch.randn(1, 32, generator=gen).half(), torch.rand(32, generator=gen).half() + 0.5
    out, new_res = gemv_dispatch.rms_norm_gemv(x[:, :32], res, nw, 1e-6, w[:, :32])
    assert torch.equal(new_res, (x[:, :32].float() + res.float()).half())
    normed = rms_norm_torch(new_res, nw, 1e-6).double()
    torch.testing.assert_close(out.double(), normed @ w[:, :32].double().t(), rtol=2 ** -8,
                               atol=2 ** -8)


def test_enabled_and_supported_runs_the_chosen_cuda_variant(monkeypatch):
    calls = []

    def fake_gemv(x, w, bias=None, act=None, *, scale=None, variant=None, persistent=None):
        calls.append(("gemv", act, variant, persistent))
        return torch.full((x.shape[0], w.shape[0]), 7.0, dtype=x.dtype)

    def fake_norm(x, residual, nw, eps, w, bias=None, scale=None, *, variant=None, persistent=None):
        calls.append(("rms_norm", None, variant, persistent))
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype), x

    monkeypatch.setattr(cuda_gemv, "enabled", lambda: True)
    monkeypatch.setattr(cuda_gemv, "supports", lambda *a, **k: True)
    monkeypatch.setattr(cuda_gemv, "supports_rms_norm", lambda *a, **k: True)
    monkeypatch.setattr(cuda_gemv, "gemv", fake_gemv)
    monkeypatch.setattr(cuda_gemv, "rms_norm_gemv", fake_norm)
    x, w, _ = _operands(n=4096, k=1024, dtype=torch.bfloat16)
    assert (gemv_dispatch.gemv(x, w) == 7).all()
    gemv_dispatch.rms_norm_gemv(x, None, torch.ones(1024, dtype=torch.bfloat16), 1e-6, w)
    want = cuda_gemv.choose_variant(4096, 1024, 2, "gemv")
    want_norm = cuda_gemv.choose_variant(4096, 1024, 2, "rms_norm")
    assert calls == [("gemv", None, want.variant, want.persistent),
                     ("rms_norm", None, want_norm.variant, want_norm.persistent)]


def test_shapes_where_triton_measured_faster_take_triton(monkeypatch):
    monkeypatch.setattr(cuda_gemv, "enabled", lambda: True)
    monkeypatch.setattr(cuda_gemv, "supports", lambda *a, **k: True)
    monkeypatch.setattr(cuda_gemv, "choose_variant", lambda *a, **k: None)
    monkeypatch.setattr(cuda_gemv, "gemv", lambda *a, **k: pytest.fail("CUDA op called"))
    x, w, _ = _operands()
    torch.testing.assert_close(gemv_dispatch.gemv(x, w).double(), x.double() @ w.double().t(),
                               rtol=2 ** -9, atol=2 ** -9)


@pytest.mark.parametrize("enabled", [False, True])
def test_bad_input_raises_value_error(monkeypatch, no_cuda_op, enabled):
    monkeypatch.setattr(cuda_gemv, "enabled", lambda: enabled)
    x, w, _ = _operands()
    nw = torch.ones(64, dtype=torch.float16)
    with pytest.raises(ValueError, match="rows"):
        gemv_dispatch.gemv(torch.zeros(5, 64, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="columns"):
        gemv_dispatch.gemv(x, w, act="silu_and_mul")  # silu_and_mul wants 2K columns
    with pytest.raises(ValueError, match="act"):
        gemv_dispatch.gemv(x, w, act="gelu")
    with pytest.raises(ValueError, match="scale"):
        gemv_dispatch.gemv(x, w.to(torch.int8), scale=torch.ones(23))
    with pytest.raises(ValueError, match="norm weight"):
        gemv_dispatch.rms_norm_gemv(x, None, nw[:32], 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        gemv_dispatch.rms_norm_gemv(x, torch.zeros(2, 64, dtype=torch.float16), nw, 1e-6, w)


def test_choose_variant_covers_the_model_shapes():
    """Every Qwen3 decode shape gets a compiled variant (0..3) or an explicit Triton verdict."""
    shapes = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (6144, 2560), (2560, 4096),
              (19456, 2560), (2560, 9728), (6144, 4096), (4096, 4096), (24576, 4096),
              (4096, 12288), (151936, 1024), (151936, 2560), (151936, 4096)]
    for n, k in shapes:
        for wbytes in (1, 2):
            for op in ("gemv", "silu_and_mul", "rms_norm"):
                choice = cuda_gemv.choose_variant(n, k, wbytes, op)
                assert choice is None or (0 <= choice.variant <= 3
                                          and isinstance(choice.persistent, bool)), (n, k, wbytes)
    assert cuda_gemv.choose_variant(4096, 4096, 1) is None  # Triton measured faster there
