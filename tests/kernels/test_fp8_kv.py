"""FP8 (e4m3) KV cache: the store kernel's quantisation against torch and the format's error,
the decode and prefill kernels reading FP8 against the torch reference reading the same bytes,
and the torch reference's FP8 attention against float32 attention.

Runs under the Triton interpreter on CPU (which needs the store kernel's exact-rounding path,
see ``minivllm.kernels.fp8``) and natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from minivllm.attention.kv_cache import (
    FP8_E4M3_MAX,
    FP8_KV_DTYPE,
    dequantize_fp8,
    quantize_fp8,
)
from minivllm.attention.torch_ref import TorchReferenceBackend, store_kv_reference
from minivllm.kernels.kv_store import store_kv
from minivllm.kernels.paged_decode import paged_decode_attention
from minivllm.kernels.testing import (REL_TOL, fp8_reference_output, make_paged_batch,
                                      quantize_batch_caches, relative_error, run_paged_kernels)

F32, F16 = torch.float32, torch.float16
E4M3_REL_STEP = 2.0 ** -3  # spacing of e4m3 values relative to their magnitude (3 mantissa bits)
E4M3_MIN_NORMAL = 2.0 ** -6


def _scales(device, generator, low=0.02, high=1.5):
    """Fresh random K and V scales (not 1.0: a kernel that ignores them must fail)."""
    k_s, v_s = (low + (high - low) * torch.rand(2, generator=generator)).tolist()
    return (torch.tensor([k_s], device=device), torch.tensor([v_s], device=device))


def _random_fp8_cache(shape, scale, device, generator):
    """A cache of random data, quantised with ``scale`` (never zeros)."""
    data = torch.randn(*shape, generator=generator) * scale.cpu() * 40
    return quantize_fp8(data, scale.cpu()).to(device)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_store_quantises_like_torch_within_e4m3_error(dtype, device, generator):
    """Magnitudes from 1e-5 to 1e3 per token (subnormals, normals and saturation), random
    scales; a padding slot stays untouched."""
    num_tokens, heads, dim = 48, 2, 64
    mags = torch.logspace(-5, 3, num_tokens)[:, None, None]
    k = (torch.randn(num_tokens, heads, dim, generator=generator) * mags).to(dtype)
    v = (torch.randn(num_tokens, heads, dim, generator=generator) * mags.flip(0)).to(dtype)
    k_scale, v_scale = _scales(device, generator)
    slots = torch.randperm(4 * 16, generator=generator)[:num_tokens]
    slots[5] = -1
    shape = (4, 16, heads, dim)
    k_cache = _random_fp8_cache(shape, k_scale, device, generator)
    v_cache = _random_fp8_cache(shape, v_scale, device, generator)
    ref_k, ref_v = k_cache.cpu().clone(), v_cache.cpu().clone()
    before = k_cache.cpu().view(torch.uint8).clone()
    store_kv(k.to(device), v.to(device), k_cache, v_cache, slots.to(device), k_scale, v_scale)
    store_kv_reference(k, v, ref_k, ref_v, slots, k_scale.cpu(), v_scale.cpu())
    for out, ref, x, scale in ((k_cache, ref_k, k, k_scale), (v_cache, ref_v, v, v_scale)):
        got, want = out.cpu().float(), ref.float()
        if device.type == "cpu":  # same IEEE division, same round-to-nearest-even: same bytes
            assert torch.equal(out.cpu().view(torch.uint8), ref.view(torch.uint8))
        else:  # the GPU's float32 division may differ in the last bit: one e4m3 step at most
            step = (want.abs() * E4M3_REL_STEP).clamp_min(2.0 ** -9)
            assert ((got - want).abs() <= step).all()
            assert (got != want).float().mean() < 1e-3
        # Round trip of the stored rows within the format's error.
        flat = out.cpu().view(-1, heads, dim)[slots[slots >= 0]]
        back = dequantize_fp8(flat, scale.cpu())
        xs = x[slots >= 0].float()
        sat = xs.clamp(-FP8_E4M3_MAX * scale.item(), FP8_E4M3_MAX * scale.item())
        # Half a step relative (normals) or 2**-10 * scale absolute (subnormals), per element.
        bound = torch.maximum(sat.abs() * E4M3_REL_STEP / 2, torch.tensor(2.0 ** -10 * scale.item()))
        assert ((back - sat).abs() <= bound * 1.0001).all()
    # Slots nobody wrote (the padding token's included) kept their old bytes.
    untouched = torch.ones(4 * 16, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    after = k_cache.cpu().view(torch.uint8)
    assert torch.equal(after.view(-1, heads, dim)[untouched],
                       before.view(-1, heads, dim)[untouched])


def test_store_rounds_ties_to_even_and_saturates(device):
    """Exact ties (normal and subnormal), signed zeros, underflow and values past 448."""
    special = [1.0625, 1.1875, -1.0625, 3 * 2.0 ** -10, 5 * 2.0 ** -10, 2.0 ** -11, -0.0, 0.0,
               464.0, 1e6, -1e6, 447.9, 0.015625, 0.0156, -7 * 2.0 ** -10]
    row = torch.tensor(special + [1.0] * (64 - len(special)))
    k = row.view(1, 1, 64).to(device)
    cache = torch.zeros(1, 16, 1, 64, dtype=FP8_KV_DTYPE, device=device)
    v_cache = torch.zeros_like(cache)
    one = torch.ones(1, device=device)
    store_kv(k, k, cache, v_cache, torch.tensor([3], device=device), one, one)
    want = row.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)
    assert torch.equal(cache[0, 3, 0].cpu().view(torch.uint8), want.view(torch.uint8))
    assert cache[0, 3, 0, :3].cpu().float().tolist() == [1.0, 1.25, -1.0]  # to even
    assert cache[0, 3, 0, 8:11].cpu().float().tolist() == [448.0, 448.0, -448.0]  # saturated


def _fp8_batch(seqs, *, block_size, group, head_dim, dtype, device, generator,
               num_padding_tokens=0):
    """A random paged batch whose caches are FP8 with random scales."""
    batch = make_paged_batch(seqs, block_size=block_size, num_kv_heads=2, group=group,
                             head_dim=head_dim, dtype=dtype, device=device,
                             num_padding_tokens=num_padding_tokens, generator=generator)
    k_scale, v_scale = _scales(device, generator)
    quantize_batch_caches(batch, k_scale, v_scale)
    return batch, k_scale, v_scale


# (block_size, gqa group, head_dim, dtype, decode splits)
DECODE_CASES = [(16, 4, 64, F32, None), (32, 1, 128, F16, 3), (16, 2, 80, F16, 1)]


@pytest.mark.parametrize("block_size,group,head_dim,dtype,num_splits", DECODE_CASES)
def test_decode_reads_fp8_like_the_reference(block_size, group, head_dim, dtype, num_splits,
                                             device, generator):
    bs = block_size
    seqs = [(bs + 1, 1), (1, 1), (6 * bs + 7, 1), (bs - 1, 1), (bs, 1)]
    batch, k_scale, v_scale = _fp8_batch(seqs, block_size=bs, group=group, head_dim=head_dim,
                                         dtype=dtype, device=device, generator=generator,
                                         num_padding_tokens=2)
    ref = fp8_reference_output(batch, k_scale, v_scale)
    out = run_paged_kernels(batch, "decode", k_scale, v_scale, num_splits)
    err = relative_error(out[:len(seqs)].cpu(), ref[:len(seqs)].cpu())
    assert err < REL_TOL[dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("group,dtype", [(2, F16), (4, F16)] + (
    [(2, torch.bfloat16)] if torch.cuda.is_available() else []))
def test_decode_fp8_through_float16_like_the_reference(group, dtype, device, generator):
    """The float16 compute path for FP8 caches (``DecodeConfig.fp8_via_fp16``, the default
    there): K/V cast exactly, a bfloat16 q rounded to float16 (finer), so the query dtype's
    tolerance. Only bfloat16 (GPU) tells it apart from the plain path."""
    from minivllm.kernels.paged_decode import DecodeConfig

    seqs = [(17, 1), (1, 1), (103, 1)]
    batch, k_scale, v_scale = _fp8_batch(seqs, block_size=16, group=group, head_dim=64,
                                         dtype=dtype, device=device, generator=generator)
    ref = fp8_reference_output(batch, k_scale, v_scale)
    out = run_paged_kernels(batch, "decode", k_scale, v_scale, 2,
                            decode_config=DecodeConfig(fp8_via_fp16=True))
    err = relative_error(out[:len(seqs)].cpu(), ref[:len(seqs)].cpu())
    assert err < REL_TOL[dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("block_size,group,head_dim,dtype", [(16, 2, 64, F32), (32, 4, 128, F16)])
def test_prefill_reads_fp8_like_the_reference(block_size, group, head_dim, dtype, device,
                                              generator):
    bs = block_size
    seqs = [(bs + 1, 1), (bs - 1, bs - 1), (2 * bs + 3, bs + 3), (0, 0), (3 * bs, 5),
            (70, 70)]
    batch, k_scale, v_scale = _fp8_batch(seqs, block_size=bs, group=group, head_dim=head_dim,
                                         dtype=dtype, device=device, generator=generator,
                                         num_padding_tokens=3)
    ref = fp8_reference_output(batch, k_scale, v_scale)
    out = run_paged_kernels(batch, "prefill", k_scale, v_scale)
    n = batch.meta.num_actual_tokens
    err = relative_error(out[:n].cpu(), ref[:n].cpu())
    assert err < REL_TOL[dtype], f"relative error {err:.3g}"


def test_fp8_kernels_refuse_a_cache_without_scales(device, generator):
    batch, _, _ = _fp8_batch([(5, 1)], block_size=16, group=1, head_dim=64, dtype=F32,
                             device=device, generator=generator)
    m = batch.meta
    with pytest.raises(ValueError, match="k_scale"):
        store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping)
    with pytest.raises(ValueError, match="k_scale"):
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, torch.empty_like(batch.q),
                               m.seq_lens, m.query_start_loc, m.block_tables, m.max_seq_len,
                               batch.scale)


# ||fp8 - fp32|| / ||fp32|| of the attention output, random N(0, 1) K/V and queries.
# e4m3 rounds each K/V element with a relative error uniform in +-2**-4 (rms ~ 2**-4 / sqrt(3)
# ~ 0.036). V's errors average over the attended keys and K's perturb the scores by
# ~ 0.036 * |q.k| * scale, so the output error sits well below one element's: ~1-2 % measured.
# A kernel that ignored a scale, or read the wrong bytes, is off by ~100 %.
FP8_ATTENTION_REL_TOL = 0.05


def test_reference_fp8_attention_close_to_float32(generator):
    seqs = [(1, 1), (17, 17), (40, 1), (90, 30)]
    batch = make_paged_batch(seqs, block_size=16, num_kv_heads=2, group=2, head_dim=64,
                             dtype=F32, generator=generator)
    # Scales that keep N(0, 1) data (|x| < ~5) below 448 * scale: no saturation here.
    k_scale, v_scale = _scales("cpu", generator, low=0.02, high=1.0)
    exact = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, batch.k_cache.clone(),
                                            batch.v_cache.clone(), batch.meta, batch.scale)
    # The same cached prefix, quantised.
    k8, v8 = quantize_fp8(batch.k_cache, k_scale), quantize_fp8(batch.v_cache, v_scale)
    assert k8.dtype == v8.dtype == FP8_KV_DTYPE
    fp8 = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, k8, v8, batch.meta,
                                          batch.scale, k_scale, v_scale)
    n = batch.meta.num_actual_tokens
    err = relative_error(fp8[:n], exact[:n])
    assert 1e-4 < err < FP8_ATTENTION_REL_TOL, err  # quantised (not a float32 copy), but close
