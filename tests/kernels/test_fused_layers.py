"""Fused Triton RMSNorm / rotary (+ q/k norm) / SiLU-and-mul against the torch layer code.

The reference is each layer's torch path (``use_triton=False``), itself checked against HF
transformers by the e2e parity tests; the kernel path is forced with ``use_triton=True`` (the
interpreter on CPU, where only float32/float16 work). Inputs are fresh random values, and q/k
come as strided views of a fused qkv buffer, the way the attention layer hands them over.

Tolerances, elementwise ``|out - ref| <= atol + rtol * |ref|``: float32 kernels differ from
torch only in float32 summation order and rsqrt/exp rounding (~1e-7 relative), so 1e-5. In
float16 the same tiny differences can flip one final rounding, one ulp = 2**-10 relative at
most, so 1e-3 (bfloat16, run on CUDA only: 2**-7, so 1e-2). Because the kernels repeat
torch's intermediate roundings (e.g. the normalised value to the input dtype before the weight
multiply), half-precision outputs must also be bit-identical to torch almost everywhere: a
kernel that skips one of those roundings stays within the tolerance but differs in ~25% of the
elements. The residual sum has a single rounding in both and must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from minivllm.layers.activation import SiluAndMul
from minivllm.layers.norm import RMSNorm, fused_kernels_apply
from minivllm.layers.rotary import RotaryEmbedding

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
       torch.float16: {"rtol": 1e-3, "atol": 1e-3},
       torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}
# Half-precision elements that must equal torch's bit for bit (seen: >= 99.98%).
MIN_EXACT_FRACTION = 0.99
# The interpreter cannot run bfloat16; a GPU run checks it too (the dtype models run in).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
MAX_POSITION = 4096


def _randn(generator: torch.Generator, *shape: int, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype).to(device)


def _norm(size: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator,
          eps: float = 1e-6) -> RMSNorm:
    """An RMSNorm with random (not all-ones) weights, so a dropped weight multiply shows."""
    norm = RMSNorm(size, eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(size, generator=generator))
    return norm


def _assert_close(out: torch.Tensor, ref: torch.Tensor, atol_scale: float = 1.0) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    tol = TOL[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=tol["rtol"], atol=tol["atol"] * atol_scale)
    # Bit-identity is a CPU (interpreter) property: on CUDA, torch's own elementwise kernels
    # use other exp/rsqrt approximations, so only the tolerance applies there.
    if ref.dtype != torch.float32 and not ref.is_cuda:
        # At most 1 % of elements may differ, plus a few for small tensors: with 64 elements a
        # single rounding flip is already 1.6 %, and random inputs would make that flaky.
        mismatches = int((out != ref).sum().item())
        allowed = int((1 - MIN_EXACT_FRACTION) * ref.numel()) + 4
        assert mismatches <= allowed, f"{mismatches} of {ref.numel()} elements differ from torch"


def _split_qkv(generator, num_tokens, num_heads, num_kv_heads, head_dim, dtype, device):
    """q, k, v as the strided views a fused qkv projection gives, plus the buffer itself."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(generator, num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    # The case the kernel must handle: rows further apart than one token's heads (a single
    # row's stride is arbitrary: reshape picks its own).
    assert num_tokens == 1 or q.stride(0) == k.stride(0) == q_size + 2 * kv_size
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 1024])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, hidden, num_tokens, with_residual, device, generator):
    norm = _norm(hidden, dtype, device, generator, eps=1e-5)
    # x as rows of a wider buffer (row stride > hidden), like a slice of a larger activation.
    x = _randn(generator, num_tokens, hidden + 8, dtype=dtype, device=device)[:, 3:3 + hidden]
    residual = _randn(generator, num_tokens, hidden, dtype=dtype, device=device) \
        if with_residual else None
    x_before = x.clone()
    res_before = residual.clone() if with_residual else None

    out = norm(x, residual, use_triton=True)
    ref = norm(x, residual, use_triton=False)

    if with_residual:
        _assert_close(out[0], ref[0])
        assert torch.equal(out[1], ref[1])  # the new residual stream: one rounding in both
        assert torch.equal(residual, res_before)
    else:
        _assert_close(out, ref)
    assert torch.equal(x, x_before)  # out of place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rms_norm_per_head_on_strided_view(dtype, head_dim, device, generator):
    """Qwen3's q/k norm: ``[T, heads, head_dim]`` views of qkv, normalised per head."""
    _, q, k = _split_qkv(generator, 7, 6, 2, head_dim, dtype, device)
    # And heads further apart than head_dim (a head stride the kernel must not assume).
    spaced = _randn(generator, 7, 3, head_dim + 16, dtype=dtype, device=device)[..., 16:]
    norm = _norm(head_dim, dtype, device, generator)
    for x in (q, k, spaced):
        _assert_close(norm(x, use_triton=True), norm(x, use_triton=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 4, 2), (128, 6, 2),
                                                             (128, 3, 3)])
@pytest.mark.parametrize("with_qk_norm", [False, True])
def test_rotary_matches_torch(dtype, num_tokens, head_dim, num_heads, num_kv_heads,
                              with_qk_norm, device, generator):
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, rope_theta=1e6).to(device)
    qkv, q, k = _split_qkv(generator, num_tokens, num_heads, num_kv_heads, head_dim, dtype,
                           device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=generator).to(device)
    positions[0] = MAX_POSITION - 1  # the last row of the cache is reachable
    norms = (_norm(head_dim, dtype, device, generator),
             _norm(head_dim, dtype, device, generator, eps=1e-5)) if with_qk_norm else ()
    qkv_before = qkv.clone()

    q_out, k_out = rotary(positions, q, k, *norms, use_triton=True)
    q_ref, k_ref = rotary(positions, q, k, *norms, use_triton=False)

    # With the q/k norm fused in, a norm output that rounds to the neighbouring 16-bit value
    # (sum order, rsqrt) moves the rotated result by up to one ulp of the *input's* magnitude
    # (|x| ~ 3 here), which a near-zero output cannot absorb in rtol: allow a few such ulps.
    scale = 4.0 if with_qk_norm and dtype != torch.float32 else 1.0
    _assert_close(q_out, q_ref, scale)
    _assert_close(k_out, k_ref, scale)
    assert torch.equal(qkv, qkv_before)  # out of place: v and the inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("d", [64, 96, 1536])
def test_silu_and_mul_matches_torch(dtype, num_tokens, d, device, generator):
    # 1536 spans two column blocks, the second one partly masked. Scaled so the gate reaches
    # the saturated tails of silu too.
    x = 4 * _randn(generator, num_tokens, 2 * d, dtype=dtype, device=device)
    act = SiluAndMul()
    _assert_close(act(x, use_triton=True), act(x, use_triton=False))
    # A row stride wider than 2 * d (a slice of a bigger buffer).
    wide = _randn(generator, num_tokens, 2 * d + 16, dtype=dtype, device=device)[:, 16:]
    _assert_close(act(wide, use_triton=True), act(wide, use_triton=False))


def test_cpu_defaults_to_torch():
    """CPU keeps the torch reference even under TRITON_INTERPRET=1 (HF parity relies on it)."""
    x = torch.randn(2, 8)
    assert fused_kernels_apply(x) is False
    assert fused_kernels_apply(x, use_triton=True) is True


def test_bad_inputs_raise_value_error(device):
    from minivllm.kernels.activation import silu_and_mul
    from minivllm.kernels.rms_norm import rms_norm
    from minivllm.kernels.rotary import rotary_embedding

    x = torch.randn(3, 64, device=device)
    w = torch.ones(64, device=device)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-6, torch.randn(3, 32, device=device))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 63, device=device))
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    cache = torch.randn(16, 32, device=device)
    positions = torch.zeros(3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="both"):
        rotary_embedding(positions, q, k, cache, cache, q_norm_weight=w)
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(positions[:2], q, k, cache, cache)
    rotary = RotaryEmbedding(64, 16, 1e4).to(device)
    with pytest.raises(ValueError, match="both"):
        rotary(positions, q, k, RMSNorm(64).to(device), None, use_triton=False)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="bfloat16"):
            rms_norm(x.bfloat16(), w.bfloat16(), 1e-6)
