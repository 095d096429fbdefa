"""The CUDA C++ GEMV (csrc/gemv.cu) against a float64 torch reference, every tile variant, and
inside a CUDA graph. Skipped where the op is unavailable (no CUDA, no nvcc, build failed);
the first test run builds it (~20-60 s, then cached). Run on the device:

    PYTHONPATH=. python -m pytest -q tests/gpu/test_cuda_gemv.py
"""

from __future__ import annotations

import itertools

import pytest
import torch

from minivllm.csrc_ops import cuda_gemv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_gemv.available(),
                                reason="needs CUDA and a working nvcc build of csrc/gemv.cu")

# Qwen3 decode shapes (0.6B qkv, o, gate_up; 4B down), rows that leave partial tiles and a
# K that is no multiple of any block's stride, and a K smaller than one block's first load.
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (2560, 9728), (1001, 2560), (75, 16)]
# (weight kind, activation dtype)
KINDS = [("same", torch.bfloat16), ("same", torch.float16), ("fp8", torch.bfloat16),
         ("fp8", torch.float16), ("int8", torch.bfloat16)]
# Norm-relative error bounds. The kernel sums in float32 like the reference up to summation
# order (~sqrt(K) * 2^-24, below 1e-5 here) and rounds each output once to the activation
# dtype: at most half an ulp, 2^-8 relative for bf16 (8 significant bits) and 2^-11 for fp16
# (11), so the norm-relative error is below that. Twice the rounding bound leaves room for the
# summation-order error and nothing else (a wrong element, row or scale costs far more).
TOLERANCE = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _weights(kind: str, dtype: torch.dtype, n: int, k: int, gen: torch.Generator):
    """``(weight, scale)``; 8-bit weights get a per-row absmax scale, as the model's loaders."""
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.05
    if kind == "same":
        return w.to(dtype), None
    qmax = 448.0 if kind == "fp8" else 127.0
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    q = w / scale[:, None]
    q = q.to(torch.float8_e4m3fn) if kind == "fp8" else q.round().clamp(-127, 127).to(torch.int8)
    return q, scale.float().contiguous()


def _reference(x, weight, bias, scale):
    w = weight.double() * (scale.double()[:, None] if scale is not None else 1.0)
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind,dtype", KINDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_every_variant(n, k, kind, dtype, m, with_bias):
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k + m)
    weight, scale = _weights(kind, dtype, n, k, gen)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype) if with_bias else None
    ref = _reference(x, weight, bias, scale)
    for variant in range(len(cuda_gemv.variants())):
        for persistent in (False, True):
            out = cuda_gemv.gemv(x, weight, bias, scale=scale, variant=variant, persistent=persistent)
            assert out.shape == (m, n) and out.dtype == dtype
            rel = _rel(out, ref)
            assert rel < TOLERANCE[dtype], (variant, persistent, rel)


def test_strided_rows():
    """x and weight rows further apart than K (slices of wider tensors), 16-byte aligned."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    wide_w = torch.randn(1024, 2048 + 64, device="cuda", generator=gen).bfloat16()
    wide_x = torch.randn(3, 2048 + 128, device="cuda", generator=gen).bfloat16()
    w, x = wide_w[:, :2048], wide_x[:, 64:64 + 2048]
    assert cuda_gemv.supports(x, w)
    out = cuda_gemv.gemv(x, w)
    assert _rel(out, _reference(x, w, None, None)) < TOLERANCE[torch.bfloat16]


def test_unaligned_and_unknown_variant_raise():
    x = torch.zeros(1, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(64, 1024, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte"):
        cuda_gemv.gemv(torch.zeros(1, 1025, device="cuda", dtype=torch.bfloat16)[:, 1:], w)
    with pytest.raises(ValueError, match="variant"):
        cuda_gemv.gemv(x, w, variant=len(cuda_gemv.variants()))


def test_graph_replay_chain_sees_fresh_inputs():
    """A chain of GEMVs, each reading the previous one's output, captured once and replayed on
    new inputs: every output must match the reference of its actual input. With programmatic
    dependent launch a kernel starts before its predecessor ends; this fails if it reads its
    input before waiting for it (it would see the previous replay's values)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    dims = [1024, 3072, 1024, 2048, 1024]
    layers = []
    for i, (k, n) in enumerate(itertools.pairwise(dims)):
        kind = "fp8" if i % 2 else "same"
        weight, scale = _weights(kind, torch.bfloat16, n, k, gen)
        bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).bfloat16() if i == 0 else None
        layers.append((weight, bias, scale))
    x = torch.randn(2, dims[0], device="cuda", generator=gen).bfloat16()

    def chain():
        outs, h = [], x
        for weight, bias, scale in layers:
            h = cuda_gemv.gemv(h, weight, bias, scale=scale)
            outs.append(h)
        return outs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    for trial in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        inputs = [x] + outs[:-1]
        for i, ((weight, bias, scale), inp, out) in enumerate(zip(layers, inputs, outs)):
            rel = _rel(out, _reference(inp, weight, bias, scale))
            assert rel < TOLERANCE[torch.bfloat16], (trial, i, rel)
