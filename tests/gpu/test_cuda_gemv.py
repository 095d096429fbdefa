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


# ---- fused input ops: silu_and_mul, RMSNorm (+ residual), against the Triton fused kernels ----
# 0.6B / 4B shapes (qkv and gate_up after the norm; down after silu) and small odd ones.
NORM_SHAPES = [(4096, 1024), (6144, 2560), (1000, 64)]
SILU_SHAPES = [(1024, 3072), (2560, 9728), (75, 16)]
EPS = 1e-6


def _ulp_rel(dtype: torch.dtype) -> float:
    """One unit in the last place, relative (bf16 keeps 8 significant bits, fp16 11)."""
    return 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10


def _identity(kind: str, dtype: torch.dtype, k: int):
    """A [k, k] identity weight: the GEMV's output is then its (fused) input, exactly."""
    eye = torch.eye(k, device="cuda")
    if kind == "same":
        return eye.to(dtype), None
    return (eye.to(torch.float8_e4m3fn) if kind == "fp8" else eye.to(torch.int8)), \
        torch.ones(k, device="cuda")


def _norm_inputs(m: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    res = (torch.randn(m, k, device="cuda", generator=gen) * 2).to(dtype)
    nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
    return x, res, nw


@pytest.mark.parametrize("kind,dtype", KINDS)
def test_silu_and_mul_input_is_bit_exact_with_triton(kind, dtype):
    """Through an identity weight the output is silu(gate) * up itself: the CUDA op's rounding
    of silu and of the product must equal the Triton kernel's bit for bit."""
    from minivllm.kernels.gemv import gemv as triton_gemv

    k, m = 2048, 1  # the fused ops take one row (batch-1 decode)
    gen = torch.Generator(device="cuda").manual_seed(k + m)
    eye, scale = _identity(kind, dtype, k)
    x = (torch.randn(m, 2 * k, device="cuda", generator=gen) * 3).to(dtype)
    ref = triton_gemv(x, eye, act="silu_and_mul", scale=scale)
    for variant in range(len(cuda_gemv.variants())):
        out = cuda_gemv.gemv(x, eye, act="silu_and_mul", scale=scale, variant=variant)
        assert torch.equal(out, ref), (variant, (out != ref).sum().item())


@pytest.mark.parametrize("n,k", SILU_SHAPES)
@pytest.mark.parametrize("kind,dtype", KINDS)
def test_silu_and_mul_matches_triton_every_variant(n, k, kind, dtype):
    from minivllm.kernels.gemv import gemv as triton_gemv

    m = 1
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    weight, scale = _weights(kind, dtype, n, k, gen)
    x = torch.randn(m, 2 * k, device="cuda", generator=gen).to(dtype)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype)
    tri = triton_gemv(x, weight, bias, act="silu_and_mul", scale=scale)
    # The reference multiplies the Triton kernel's own fused input (identity weight, exact).
    eye, eye_scale = _identity("same", dtype, k)
    used = triton_gemv(x, eye, act="silu_and_mul", scale=eye_scale)
    ref = _reference(used, weight, bias, scale)
    assert _rel(tri, ref) < TOLERANCE[dtype]
    for variant in range(len(cuda_gemv.variants())):
        for persistent in (False, True):
            out = cuda_gemv.gemv(x, weight, bias, "silu_and_mul", scale=scale, variant=variant,
                                 persistent=persistent)
            assert out.shape == (m, n) and out.dtype == dtype
            assert _rel(out, ref) < TOLERANCE[dtype], (variant, persistent)


@pytest.mark.parametrize("kind,dtype", KINDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_input_matches_triton(kind, dtype, with_residual):
    """Through an identity weight the output is the normalised input itself. The new residual
    (x + residual, rounded) is bit-exact. The normalised values are bit-exact up to the sum of
    squares: the CUDA op adds it in another order than Triton, so rstd may differ by a float32
    ulp or so, which moves a value across a rounding boundary about once in 2^16 (bf16) or
    2^13 (fp16) elements, by one ulp of the activation dtype."""
    from minivllm.kernels.gemv import rms_norm_gemv as triton_rms_norm_gemv

    k, m = 2560, 1
    gen = torch.Generator(device="cuda").manual_seed(k + m + with_residual)
    eye, scale = _identity(kind, dtype, k)
    x, res, nw = _norm_inputs(m, k, dtype, gen)
    res = res if with_residual else None
    ref, ref_res = triton_rms_norm_gemv(x, res, nw, EPS, eye, None, scale)
    for variant in range(len(cuda_gemv.variants())):
        out, out_res = cuda_gemv.rms_norm_gemv(x, res, nw, EPS, eye, None, scale, variant=variant)
        assert torch.equal(out_res, ref_res)
        if with_residual:
            assert torch.equal(out_res, (x.float() + res.float()).to(dtype))
        else:
            assert out_res is x
        diff = (out.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * _ulp_rel(dtype) + 2.0 ** -24).all(), variant
        assert (diff > 0).float().mean().item() < 1e-3, variant


@pytest.mark.parametrize("n,k", NORM_SHAPES)
@pytest.mark.parametrize("kind,dtype", KINDS)
def test_rms_norm_gemv_matches_triton_every_variant(n, k, kind, dtype):
    from minivllm.kernels.gemv import rms_norm_gemv as triton_rms_norm_gemv

    m = 1
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    weight, scale = _weights(kind, dtype, n, k, gen)
    x, res, nw = _norm_inputs(m, k, dtype, gen)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype) if n % 3 == 1 else None
    tri, tri_res = triton_rms_norm_gemv(x, res, nw, EPS, weight, bias, scale)
    eye, _ = _identity("same", dtype, k)
    used, _ = triton_rms_norm_gemv(x, res, nw, EPS, eye)  # the normalised input, exactly
    ref = _reference(used, weight, bias, scale)
    assert _rel(tri, ref) < TOLERANCE[dtype]
    for variant in range(len(cuda_gemv.variants())):
        for persistent in (False, True):
            out, out_res = cuda_gemv.rms_norm_gemv(x, res, nw, EPS, weight, bias, scale,
                                                   variant=variant, persistent=persistent)
            assert torch.equal(out_res, tri_res), (variant, persistent)
            assert out.shape == (m, n) and out.dtype == dtype
            assert _rel(out, ref) < TOLERANCE[dtype], (variant, persistent, _rel(out, ref))


def test_fused_ops_outside_the_cuda_op_take_triton_in_the_dispatcher(monkeypatch):
    """Two rows (the fused CUDA ops take one) and a row too wide to stage in shared memory:
    the CUDA op refuses them with ValueError, the dispatcher (switch on) runs Triton."""
    from minivllm.kernels.gemv import rms_norm_gemv as triton_rms_norm_gemv
    from minivllm.layers import gemv_dispatch

    monkeypatch.setattr(cuda_gemv, "enabled", lambda: True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for m, k, match in [(2, 1024, "one row"), (1, 32768, "shared memory")]:
        w, _ = _weights("same", torch.bfloat16, 64, k, gen)
        x, res, nw = _norm_inputs(m, k, torch.bfloat16, gen)
        assert not cuda_gemv.supports_rms_norm(x, res, nw, w)
        with pytest.raises(ValueError, match=match):
            cuda_gemv.rms_norm_gemv(x, res, nw, EPS, w)
        out, new_res = gemv_dispatch.rms_norm_gemv(x, res, nw, EPS, w)
        ref, ref_res = triton_rms_norm_gemv(x, res, nw, EPS, w)
        assert torch.equal(out, ref) and torch.equal(new_res, ref_res)
    xs = torch.randn(2, 2048, device="cuda", generator=gen).bfloat16()
    w, _ = _weights("same", torch.bfloat16, 64, 1024, gen)
    with pytest.raises(ValueError, match="one row"):
        cuda_gemv.gemv(xs, w, act="silu_and_mul")
    assert gemv_dispatch.gemv(xs, w, act="silu_and_mul").shape == (2, 64)


def test_fused_graph_replay_chain_sees_fresh_inputs():
    """A decoder-layer-shaped chain in one CUDA graph: norm+qkv-like GEMV (writing the new
    residual), a plain GEMV, norm+gate_up reading that residual, silu+down; replayed on fresh
    inputs. With PDL each kernel starts early; this fails if one reads its input (x, the
    residual, the staged norm input) before waiting for its producer."""
    from minivllm.kernels.gemv import gemv as triton_gemv
    from minivllm.kernels.gemv import rms_norm_gemv as triton_rms_norm_gemv

    gen = torch.Generator(device="cuda").manual_seed(3)
    h, inter, dtype = 1024, 3072, torch.bfloat16
    w_qkv, _ = _weights("same", dtype, 2048, h, gen)
    w_o, s_o = _weights("fp8", dtype, h, 2048, gen)
    w_gu, s_gu = _weights("fp8", dtype, 2 * inter, h, gen)
    w_down, _ = _weights("same", dtype, h, inter, gen)
    nw1 = (1 + 0.1 * torch.randn(h, device="cuda", generator=gen)).to(dtype)
    nw2 = (1 + 0.1 * torch.randn(h, device="cuda", generator=gen)).to(dtype)
    x = torch.randn(1, h, device="cuda", generator=gen).to(dtype)
    res = torch.randn(1, h, device="cuda", generator=gen).to(dtype)

    def chain(ops):
        gemv_fn, norm_fn = ops
        qkv, res1 = norm_fn(x, res, nw1, EPS, w_qkv)
        o = gemv_fn(qkv, w_o, scale=s_o)
        gu, res2 = norm_fn(o, res1, nw2, EPS, w_gu, None, s_gu)
        down = gemv_fn(gu, w_down, act="silu_and_mul")
        return [qkv, res1, o, gu, res2, down]

    cuda_ops = (cuda_gemv.gemv, cuda_gemv.rms_norm_gemv)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(cuda_ops)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(cuda_ops)
    for trial in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        res.copy_(torch.randn(res.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        qkv, res1, o, gu, res2, down = outs
        # Each output against the Triton kernel on that kernel's actual inputs.
        ref_qkv, ref_res1 = triton_rms_norm_gemv(x, res, nw1, EPS, w_qkv)
        ref_gu, ref_res2 = triton_rms_norm_gemv(o, res1, nw2, EPS, w_gu, None, s_gu)
        assert torch.equal(res1, ref_res1) and torch.equal(res2, ref_res2), trial
        pairs = [(qkv, ref_qkv), (o, triton_gemv(qkv, w_o, scale=s_o)), (gu, ref_gu),
                 (down, triton_gemv(gu, w_down, act="silu_and_mul"))]
        for i, (out, ref) in enumerate(pairs):
            assert _rel(out, ref.double()) < TOLERANCE[dtype], (trial, i)


def test_dispatch_routes_to_the_cuda_op_when_enabled(monkeypatch):
    """With the switch on, the model's GEMV entry points run the CUDA op at the chosen variant
    (bit-identical to calling it directly) and still agree with the Triton kernels."""
    from minivllm.kernels.gemv import gemv as triton_gemv
    from minivllm.layers import gemv_dispatch

    monkeypatch.setattr(cuda_gemv, "enabled", lambda: True)
    gen = torch.Generator(device="cuda").manual_seed(4)
    w, s = _weights("fp8", torch.bfloat16, 6144, 1024, gen)
    x, res, nw = _norm_inputs(1, 1024, torch.bfloat16, gen)
    out, new_res = gemv_dispatch.rms_norm_gemv(x, res, nw, EPS, w, None, s)
    choice = cuda_gemv.choose_variant(6144, 1024, 1, "rms_norm")
    direct, _ = cuda_gemv.rms_norm_gemv(x, res, nw, EPS, w, None, s, variant=choice.variant,
                                        persistent=choice.persistent)
    assert torch.equal(out, direct) and torch.equal(new_res, (x.float() + res.float()).bfloat16())
    wd, _ = _weights("same", torch.bfloat16, 1024, 3072, gen)
    xd = torch.randn(1, 6144, device="cuda", generator=gen).bfloat16()
    down = gemv_dispatch.gemv(xd, wd, act="silu_and_mul")
    assert _rel(down, triton_gemv(xd, wd, act="silu_and_mul").double()) < TOLERANCE[torch.bfloat16]
    with pytest.raises(ValueError):
        gemv_dispatch.gemv(xd, wd)  # 6144 columns for a K = 3072 weight without the act
