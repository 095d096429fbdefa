"""Attention-kernel check and benchmark: Triton paged kernels vs copy bandwidth and torch SDPA.

    PYTHONPATH=. python benchmarks/kernels.py --out DIR          # on a CUDA GPU
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kernels.py --smoke   # CPU dry run

Sections (all in one process, so one GPU lease covers them):
  1. correctness: bf16 (plus fp16/fp32) kernels vs the float32 torch reference on random paged
     batches, output poisoned with NaN first; a cache over 2**31 elements (int64 addressing);
     the decode step captured in a CUDA graph and replayed with new lengths.
  2. device-to-device copy bandwidth (bytes read + written), the decode roofline.
  3. decode: KV bytes read / time over batch x context, vs copy bandwidth and vs SDPA on the
     same data laid out contiguously ([B, Hkv, L, D]; the GQA group is SDPA's query length).
  3b. the same decode shapes over an FP8 (e4m3) cache: 1 byte per element, dequantised in
     registers; as a fraction of copy bandwidth and as time relative to the bf16 cache.
  4. prefill (causal, one request): TFLOP/s (2 * N^2 * D * H, the usual causal count) vs SDPA.
  5. optional (--tune): launch-config variants on representative shapes.
Writes kernels-<device>-<date>.json and .md under --out; prints the summary table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minivllm.kernels.common import cdiv, num_sms
from minivllm.kernels.kv_store import store_kv
from minivllm.kernels.paged_decode import (DEFAULT_DECODE_CONFIG, DecodeConfig,
                                           default_decode_config,
                                           choose_num_splits, paged_decode_attention)
from minivllm.kernels.paged_prefill import PrefillConfig, paged_prefill_attention
from minivllm.kernels.testing import (REL_TOL, make_paged_batch, reference_output,
                                      relative_error)
from minivllm.attention.kv_cache import quantize_fp8
from minivllm.attention.torch_ref import TorchReferenceBackend
from minivllm.attention.triton_backend import TritonAttentionBackend

GIB = 1 << 30


def time_ms(fn, smoke: bool) -> float:
    """Median device time of one ``fn`` call, launch overhead excluded, L2 cold.

    Times CUDA-graph replays of ``reps x (flush L2; fn)`` minus replays of ``reps x flush``:
    decode calls take ~10-100 us, about what Python needs to launch a Triton kernel, so eager
    timing would measure the host (the engine graph-captures decode for the same reason).
    """
    if smoke:  # interpreter: one call, just to exercise the path
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) off the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(2, min(20, int(20 / max(begin.elapsed_time(end), 1e-3))))

    def replay_ms(with_fn: bool) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graph.replay()
        times = []
        for _ in range(9):
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return (replay_ms(True) - replay_ms(False)) / reps


def eager_time_ms(fn) -> float:
    """Host-launched calls (do_bench), for the launch-overhead column."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


# ----------------------------------------------------------------------------- correctness
def run_backend(batch, out_poison: bool = True) -> torch.Tensor:
    m = batch.meta
    store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping)
    out = torch.full_like(batch.q, float("nan")) if out_poison else torch.empty_like(batch.q)
    if m.max_query_len == 1:
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                               m.query_start_loc, m.block_tables, m.max_seq_len, batch.scale)
    else:
        paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                                m.query_start_loc, m.block_tables, m.max_query_len, batch.scale)
    return out


def check_correctness(device: torch.device, smoke: bool) -> list[dict]:
    dtypes = [torch.float32] if smoke else [torch.bfloat16, torch.float16, torch.float32]
    long = 60 if smoke else 3000
    cases = [(16, 1, 64), (16, 4, 128), (32, 8, 128), (64, 2, 64), (16, 8, 64), (32, 4, 96)]
    rows = []
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for dtype in dtypes:
        for bs, group, dim in (cases if dtype == torch.bfloat16 else cases[:2]):
            shapes = {
                "decode": [(1, 1), (bs - 1, 1), (bs, 1), (bs + 1, 1), (long, 1), (long // 3, 1)],
                "mixed": [(bs + 1, 1), (long, long // 2), (bs, bs), (1, 1), (2 * bs, bs - 1),
                          (long // 2 + 7, long // 2 + 7), (3 * bs + 1, 1)],
            }
            for kind, seqs in shapes.items():
                batch = make_paged_batch(seqs, block_size=bs, num_kv_heads=2, group=group,
                                         head_dim=dim, dtype=dtype, device=device,
                                         num_padding_tokens=3, generator=gen)
                ref, _, _ = reference_output(batch)
                n = batch.meta.num_actual_tokens
                try:
                    err = relative_error(run_backend(batch)[:n], ref[:n])
                except Exception as exc:  # keep the lease's other results; report the failure
                    print(f"ERROR {kind} {dtype} bs={bs} gqa={group} d={dim}: {exc!r}"[:400])
                    err = math.inf
                rows.append(dict(check=f"{kind} bs={bs} gqa={group} d={dim}",
                                 dtype=str(dtype).removeprefix("torch."), rel_err=err,
                                 tol=REL_TOL[dtype], ok=err < REL_TOL[dtype]))
    if not smoke:
        for check in (check_int64_addressing, check_cuda_graph):
            try:
                rows.append(check(device, gen))
            except Exception as exc:
                print(f"ERROR {check.__name__}: {exc!r}"[:400])
                rows.append(dict(check=check.__name__, dtype="bfloat16", rel_err=math.inf,
                                 tol=REL_TOL[torch.bfloat16], ok=False))
    return rows


def check_int64_addressing(device: torch.device, gen: torch.Generator) -> dict:
    """Blocks past element 2**31 of a ~4.3 GB-per-tensor cache, via store, decode and prefill."""
    bs, hkv, dim = 16, 8, 128
    num_blocks = (2 ** 31) // (bs * hkv * dim) + 64
    seqs = [(700, 300), (40 * bs + 1, 1)]
    batch = make_paged_batch(seqs, block_size=bs, num_kv_heads=hkv, group=2, head_dim=dim,
                             dtype=torch.bfloat16, device=device, generator=gen)
    ref, _, _ = reference_output(batch)
    # Move the batch into a huge cache, onto its last blocks.
    big_k = torch.randn(num_blocks, bs, hkv, dim, device=device, dtype=torch.bfloat16)
    big_v = torch.randn_like(big_k)
    shift = num_blocks - batch.k_cache.shape[0]
    big_k[shift:] = batch.k_cache
    big_v[shift:] = batch.v_cache
    m = batch.meta
    m.block_tables += shift
    m.slot_mapping = torch.where(m.slot_mapping >= 0, m.slot_mapping + shift * bs, -1)
    batch.k_cache, batch.v_cache = big_k, big_v
    out = run_backend(batch)  # mixed batch: varlen kernel
    err = relative_error(out, ref)
    # The decode request alone, through the split-KV kernel.
    dec = torch.full_like(batch.q, float("nan"))
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
    paged_decode_attention(batch.q[300:], big_k, big_v, dec[300:], m.seq_lens[1:], qsl,
                           m.block_tables[1:], m.max_seq_len, batch.scale)
    err = max(err, relative_error(dec[300:], ref[300:]))
    del big_k, big_v
    torch.cuda.empty_cache()
    return dict(check=f"int64 addressing: cache {num_blocks * bs * hkv * dim / 2**31:.2f}x2^31",
                dtype="bfloat16", rel_err=err, tol=REL_TOL[torch.bfloat16],
                ok=err < REL_TOL[torch.bfloat16])


def check_cuda_graph(device: torch.device, gen: torch.Generator) -> dict:
    """Capture store + decode once at a static cap, replay with other lengths and slots."""
    backend = TritonAttentionBackend()
    seqs = [(100, 1), (3000, 1), (17, 1), (1, 1)]
    cap = 4096  # static max_seq_len; block tables are as wide as the cap, as in the engine
    batch = make_paged_batch(seqs, block_size=16, num_kv_heads=2, group=4, head_dim=128,
                             dtype=torch.bfloat16, device=device, spare_blocks=200,
                             extra_table_cols=cap // 16 - 188, generator=gen)
    m = batch.meta
    m.max_seq_len = cap
    static_out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, m,
                                 batch.scale)  # warm-up compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache,
                                     m, batch.scale)
    worst = 0.0
    for _ in range(3):  # each step: every request one token longer (within its last block)
        new_lens = m.seq_lens_cpu + 1
        for i, seq_len in enumerate(new_lens.tolist()):
            pos = seq_len - 1
            block = int(m.block_tables[i, pos // 16])
            m.slot_mapping[i] = block * 16 + pos % 16
        m.seq_lens.copy_(new_lens.to(device))
        m.seq_lens_cpu.copy_(new_lens)
        for t in (batch.q, batch.k, batch.v):
            t.copy_(torch.randn(t.shape, generator=gen).to(t))
        ref_k, ref_v = batch.k_cache.float().clone(), batch.v_cache.float().clone()
        static_out.fill_(float("nan"))
        graph.replay()
        ref = TorchReferenceBackend().forward(batch.q.float(), batch.k.float(), batch.v.float(),
                                              ref_k, ref_v, m, batch.scale)
        n = m.num_actual_tokens
        worst = max(worst, relative_error(static_out[:n], ref[:n]))
    return dict(check="cuda graph: decode captured at cap 4096, replayed 3 steps",
                dtype="bfloat16", rel_err=worst, tol=REL_TOL[torch.bfloat16],
                ok=worst < REL_TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- bandwidth
def copy_bandwidth(device: torch.device, smoke: bool) -> dict:
    """Bytes read + written per second by a large device-to-device copy (GB/s), two ways.

    ``memcpy``: host-launched ``copy_`` (cudaMemcpyAsync; do_bench). ``kernel``: an SM copy
    kernel (``mul(src, 1)``) timed like the kernels. A memcpy captured in a graph runs on the
    copy engines instead (~2.4 TB/s seen on an H100), so it is not used. The roofline is the max.
    """
    n = (1 << 20) if smoke else 2 * GIB
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    res = dict(kernel=2 * n / (time_ms(lambda: torch.mul(src, 1.0, out=dst), smoke) * 1e-3) / 1e9)
    if not smoke:
        res["memcpy"] = 2 * n / (eager_time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    res["roofline"] = max(res.values())
    return res


# ----------------------------------------------------------------------------- decode
def make_pool(num_blocks: int, bs: int, hkv: int, dim: int, dtype, device):
    k_pool = torch.randn(num_blocks, bs, hkv, dim, device=device, dtype=dtype)
    return k_pool, torch.randn_like(k_pool)


def contiguous_kv(pool: torch.Tensor, tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, Hkv, ctx, D] copy of the paged rows, for SDPA."""
    batch, nb = tables.shape
    rows = pool[tables.long()].reshape(batch, nb * pool.shape[1], *pool.shape[2:])[:, :ctx]
    return rows.permute(0, 2, 1, 3).contiguous()


def bench_decode(device, smoke, shapes, heads=(32, 8), dim=128, bs=16,
                 configs=None, with_sdpa=True, kv_fp8: bool = False) -> list[dict]:
    """``kv_fp8``: the cache in float8 e4m3 (1 byte per element, bf16 queries), bytes counted
    as stored; its ``vs_bf16_rel_err`` compares with the same pool read in bf16."""
    configs = configs or (None,)  # None: the kernel's own default for the cache and batch
    num_heads, hkv = heads
    group = num_heads // hkv
    dtype = torch.float32 if smoke else torch.bfloat16
    pool_blocks = max(b * cdiv(c, bs) for b, c in shapes)
    k_pool, v_pool = make_pool(pool_blocks, bs, hkv, dim, dtype, device)
    scales = {}
    if kv_fp8:
        scales = dict(k_scale=torch.tensor([0.02], device=device),
                      v_scale=torch.tensor([0.01], device=device))
        k_exact, v_exact = k_pool, v_pool
        k_pool = quantize_fp8(k_pool, scales["k_scale"])
        v_pool = quantize_fp8(v_pool, scales["v_scale"])
    scale = dim ** -0.5
    rows = []
    for batch, ctx in shapes:
        nb = cdiv(ctx, bs)
        tables = torch.randperm(pool_blocks, device=device)[:batch * nb].view(batch, nb)
        tables = tables.to(torch.int32)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
        q = torch.randn(batch, num_heads, dim, device=device, dtype=dtype)
        out = torch.empty_like(q)
        kv_bytes = 2 * batch * ctx * hkv * dim * k_pool.element_size()
        row = dict(batch=batch, ctx=ctx, block_size=bs, kv_mb=kv_bytes / 1e6)
        for cfg in configs:
            def run(cfg=cfg):
                paged_decode_attention(q, k_pool, v_pool, out, seq_lens, qsl, tables, ctx, scale,
                                       config=cfg, **scales)
            key = "triton" if len(configs) == 1 else cfg_name(cfg)
            try:
                ms = time_ms(run, smoke)
            except Exception as exc:
                print(f"ERROR decode {key} {batch}x{ctx}: {exc!r}"[:400])
                continue
            row[f"{key}_us"] = ms * 1e3
            row[f"{key}_gbps"] = kv_bytes / (ms * 1e-3) / 1e9
            row["splits"] = choose_num_splits(
                batch, hkv, ctx, device,
                cfg or default_decode_config(kv_fp8, batch * hkv, num_sms(device)))
            if len(configs) == 1 and not smoke:
                row["triton_eager_us"] = eager_time_ms(run) * 1e3
        if kv_fp8:
            run(configs[0])
            exact = torch.empty_like(out)
            paged_decode_attention(q, k_exact, v_exact, exact, seq_lens, qsl, tables, ctx, scale)
            row["vs_bf16_rel_err"] = relative_error(out, exact)
        if with_sdpa:
            run(configs[0])
            kc, vc = contiguous_kv(k_pool, tables, ctx), contiguous_kv(v_pool, tables, ctx)
            qc = q.view(batch, hkv, group, dim)
            sdpa_out = F.scaled_dot_product_attention(qc, kc, vc, scale=scale)
            row["vs_sdpa_rel_err"] = relative_error(out.view_as(qc), sdpa_out)
            ms = time_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=scale), smoke)
            row["sdpa_us"] = ms * 1e3
            row["sdpa_gbps"] = kv_bytes / (ms * 1e-3) / 1e9
            del kc, vc, sdpa_out
        rows.append(row)
    del k_pool, v_pool
    if kv_fp8:
        del k_exact, v_exact
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- prefill
def bench_prefill(device, smoke, lengths, heads=(32, 8), dim=128, bs=16, configs=(None,),
                  with_sdpa=True) -> list[dict]:
    num_heads, hkv = heads
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        batch = make_paged_batch([(n, n)], block_size=bs, num_kv_heads=hkv,
                                 group=num_heads // hkv, head_dim=dim, dtype=dtype,
                                 device=device, generator=gen)
        m = batch.meta
        store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping)
        out = torch.empty_like(batch.q)
        flops = 2.0 * n * n * dim * num_heads  # causal: half of 4 * N^2 * D * H
        row = dict(tokens=n, head_dim=dim, heads=f"{num_heads}/{hkv}", block_size=bs)
        for cfg in configs:
            def run(cfg=cfg):
                paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                                        m.query_start_loc, m.block_tables, n, batch.scale,
                                        config=cfg)
            key = "triton" if len(configs) == 1 else cfg_name(cfg)
            try:
                ms = time_ms(run, smoke)
            except Exception as exc:
                print(f"ERROR prefill {key} {n}: {exc!r}"[:400])
                continue
            row[f"{key}_ms"] = ms
            row[f"{key}_tflops"] = flops / (ms * 1e-3) / 1e12
        if with_sdpa:
            run(configs[0])
            q = batch.q.transpose(0, 1).unsqueeze(0)  # [1, H, N, D]
            k = batch.k.transpose(0, 1).unsqueeze(0).contiguous()
            v = batch.v.transpose(0, 1).unsqueeze(0).contiguous()
            q = q.contiguous()
            for name, backend in sdpa_backends(smoke):
                fn = sdpa_fn(q, k, v, batch.scale, backend)
                if fn is None:
                    continue
                ref = fn()
                row[f"{name}_rel_err"] = relative_error(out, ref[0].transpose(0, 1))
                ms = time_ms(fn, smoke)
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
        rows.append(row)
        del batch, out
    return rows


def sdpa_backends(smoke: bool):
    from torch.nn.attention import SDPBackend
    if smoke:
        return [("sdpa_flash", None)]
    return [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]


def sdpa_fn(q, k, v, scale, backend):
    """A causal GQA SDPA call pinned to ``backend``; None if that backend refuses the shapes."""
    from torch.nn.attention import sdpa_kernel

    def call():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)
    try:
        call()
        return call
    except RuntimeError as exc:  # e.g. GQA unsupported by this backend build: expand K/V
        print(f"note: SDPA {backend} with enable_gqa: {str(exc).splitlines()[0][:120]}")
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def call_expanded():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    try:
        call_expanded()
        return call_expanded
    except RuntimeError as exc:
        print(f"note: SDPA {backend} unavailable: {str(exc).splitlines()[0][:120]}")
        return None


def cfg_name(cfg) -> str:
    if cfg is None:
        return "default"
    if isinstance(cfg, DecodeConfig):
        return (f"n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}p{cfg.programs_per_sm}"
                f"x{cfg.max_splits}t{cfg.min_tokens_per_split}"
                + ("h" if cfg.fp8_via_fp16 else ""))
    return f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"


# ----------------------------------------------------------------------------- tuning
def tune(device, smoke, decode_only: bool = False, fp8_only: bool = False) -> dict:
    base = DEFAULT_DECODE_CONFIG
    dec_cfgs = [base] + [dataclasses.replace(base, **kw) for kw in [
        dict(block_n=128), dict(num_stages=4), dict(num_stages=2), dict(max_splits=64),
        dict(max_splits=64, min_tokens_per_split=128), dict(programs_per_sm=8, max_splits=64),
        dict(programs_per_sm=2), dict(block_n=32, num_stages=4), dict(num_warps=8, block_n=128)]]
    dec_shapes = [(1, 64)] if smoke else [(1, 16384), (1, 4096), (8, 1024), (8, 4096),
                                          (32, 1024), (128, 128), (256, 4096)]
    pre_cfgs = [PrefillConfig(bm, bn, w, s) for bm, bn, w, s in [
        (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3)]]
    # FP8 tiles are half the bytes: the best tile / pipeline depth may differ from bf16's, and
    # the cast to the dot's dtype is per element (float16: one instruction per pair).
    fp8_cfgs = dec_cfgs[:2] + [dataclasses.replace(base, fp8_via_fp16=True, **kw) for kw in [
        dict(), dict(block_n=128), dict(block_n=128, num_warps=8), dict(num_stages=4),
        dict(block_n=32, num_stages=4), dict(block_n=128, num_stages=2),
        dict(block_n=128, num_stages=4), dict(block_n=256, num_stages=2),
        dict(block_n=256, num_warps=8, num_stages=2), dict(block_n=128, num_warps=2)]]
    out = {}
    if not fp8_only:
        out["decode"] = bench_decode(device, smoke, dec_shapes, configs=dec_cfgs, with_sdpa=False)
        out["decode_bs64"] = bench_decode(device, smoke, dec_shapes[:4], bs=64, with_sdpa=False)
    out["decode_fp8"] = bench_decode(device, smoke, dec_shapes, configs=fp8_cfgs,
                                     with_sdpa=False, kv_fp8=True)
    # W1's shape: Qwen3-0.6B heads (16 q, 8 kv), batch 256 at ~1k context, bf16 and FP8.
    w1_shapes = [(1, 64)] if smoke else [(256, 1024), (128, 2048)]
    out["decode_w1_bf16"] = bench_decode(device, smoke, w1_shapes, heads=(16, 8),
                                         configs=dec_cfgs[:2], with_sdpa=False)
    out["decode_w1_fp8"] = bench_decode(device, smoke, w1_shapes, heads=(16, 8), configs=fp8_cfgs,
                                        with_sdpa=False, kv_fp8=True)
    if decode_only or fp8_only:
        return out
    out["prefill"] = bench_prefill(device, smoke, [64] if smoke else [1024, 4096],
                                   configs=pre_cfgs, with_sdpa=False)
    out["prefill_d64"] = bench_prefill(device, smoke, [64] if smoke else [4096], dim=64,
                                       configs=[PrefillConfig(bm, bn, w, s) for bm, bn, w, s in
                                                [(128, 64, 4, 3), (128, 64, 8, 3),
                                                 (128, 128, 8, 3), (64, 64, 4, 3)]],
                                       with_sdpa=False)
    return out


# ----------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    lines = [f"# Attention kernels on {res['device']}", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}; torch {res['torch']}, "
             f"triton {res['triton']}.  ",
             f"Copy bandwidth (read + write), the decode roofline: {res['copy_gbps']:.0f} GB/s "
             f"(memcpy {res['copy'].get('memcpy', math.nan):.0f}, SM copy kernel "
             f"{res['copy']['kernel']:.0f}).  ",
             "Timing: CUDA-graph replays with L2 flushed before each call, minus the flush alone "
             "(median of 9); 'eager' = host-launched, do_bench median.", "",
             "## Correctness (relative L2 error vs float32 torch reference, output NaN-poisoned)",
             "", "| check | dtype | rel err | tol | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['dtype']} | {r['rel_err']:.2e} | {r['tol']:.0e} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in res["correctness"]]
    lines += ["", "## Decode (Hq=32, Hkv=8, D=128, bf16, block 16; bytes = K+V read)", "",
              "| batch | ctx | KV MB | splits | triton us | triton GB/s | % copy BW | SDPA us | "
              "SDPA GB/s | rel diff vs SDPA | triton eager us |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['batch']} | {r['ctx']} | {r['kv_mb']:.1f} | {r['splits']} | "
                     f"{r.get('triton_us', math.nan):.1f} | {r.get('triton_gbps', math.nan):.0f} | "
                     f"{100 * r.get('triton_gbps', math.nan) / res['copy_gbps']:.0f}% | "
                     f"{r.get('sdpa_us', math.nan):.1f} | {r.get('sdpa_gbps', math.nan):.0f} | "
                     f"{r.get('vs_sdpa_rel_err', math.nan):.1e} | "
                     f"{r.get('triton_eager_us', math.nan):.1f} |")
    fp8 = {(r["batch"], r["ctx"]): r for r in res.get("decode_fp8", [])}
    if fp8:
        bf16 = {(r["batch"], r["ctx"]): r for r in res["decode"]}
        lines += ["", "## Decode, FP8 (e4m3) KV cache (same shapes, bf16 queries; bytes = K+V "
                  "read, 1 per element)", "",
                  "| batch | ctx | KV MB | triton us | GB/s | % copy BW | time vs bf16 cache | "
                  "rel diff vs bf16 cache |", "|---|---|---|---|---|---|---|---|"]
        for key, r in fp8.items():
            base = bf16.get(key, {}).get("triton_us", math.nan)
            lines.append(f"| {r['batch']} | {r['ctx']} | {r['kv_mb']:.1f} | "
                         f"{r.get('triton_us', math.nan):.1f} | "
                         f"{r.get('triton_gbps', math.nan):.0f} | "
                         f"{100 * r.get('triton_gbps', math.nan) / res['copy_gbps']:.0f}% | "
                         f"{r.get('triton_us', math.nan) / base:.2f} | "
                         f"{r.get('vs_bf16_rel_err', math.nan):.1e} |")
    lines += ["", "## Prefill (one causal request, Hq=32, Hkv=8, bf16, block 16; "
              "FLOPs = 2 N^2 D H)", "",
              "| tokens | D | triton ms | triton TFLOP/s | SDPA flash ms | TFLOP/s | "
              "time / flash | SDPA cuDNN TFLOP/s | rel diff vs flash |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["prefill"]:
        flash = r.get("sdpa_flash_ms", math.nan)
        lines.append(f"| {r['tokens']} | {r['head_dim']} | {r.get('triton_ms', math.nan):.3f} | "
                     f"{r.get('triton_tflops', math.nan):.0f} | {flash:.3f} | "
                     f"{r.get('sdpa_flash_tflops', math.nan):.0f} | "
                     f"{r.get('triton_ms', math.nan) / flash:.2f} | "
                     f"{r.get('sdpa_cudnn_tflops', math.nan):.0f} | "
                     f"{r.get('sdpa_flash_rel_err', math.nan):.1e} |")
    if res.get("fp8_gemm"):
        lines += ["", fp8_gemm_markdown(res["fp8_gemm"], res.get("copy_gbps"))]
    lines += ["", "## Targets (H100)", ""] + [f"- {t}" for t in targets(res)]
    return "\n".join(lines) + "\n"


def targets(res: dict) -> list[str]:
    """The issue's targets, checked against this run's numbers."""
    out = []
    big = [r for r in res["decode"] if r["kv_mb"] >= 32]
    if big:
        fracs = [r.get("triton_gbps", math.nan) / res["copy_gbps"] for r in big]
        worst = min(big, key=lambda r: r.get("triton_gbps", math.nan))
        out.append(f"decode >= 70% of copy BW where KV >= 32 MB: {sum(f >= 0.7 for f in fracs)}"
                   f"/{len(big)} shapes meet it; min {100 * min(fracs):.0f}% (batch "
                   f"{worst['batch']}, ctx {worst['ctx']}), median "
                   f"{100 * sorted(fracs)[len(fracs) // 2]:.0f}%")
    big8 = [r for r in res.get("decode_fp8", []) if r["kv_mb"] >= 32]
    if big8:
        fracs = [r.get("triton_gbps", math.nan) / res["copy_gbps"] for r in big8]
        out.append(f"FP8 decode >= 80% of copy BW where KV >= 32 MB: "
                   f"{sum(f >= 0.8 for f in fracs)}/{len(big8)} shapes meet it; min "
                   f"{100 * min(fracs):.0f}%, median {100 * sorted(fracs)[len(fracs) // 2]:.0f}%")
    for r in res.get("prefill", []):
        if r["tokens"] == 4096 and r["head_dim"] == 128:
            ratio = r.get("triton_ms", math.nan) / r.get("sdpa_flash_ms", math.nan)
            out.append(f"prefill 4k, D=128: {r.get('triton_tflops', math.nan):.0f} TFLOP/s "
                       f"(target >= 300), {ratio:.2f}x SDPA flash time (target <= 1.3)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter ok")
    ap.add_argument("--tune", action="store_true", help="also sweep launch configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--decode-only", action="store_true",
                    help="skip correctness and prefill: copy bandwidth, bf16 and FP8 decode")
    ap.add_argument("--fp8-only", action="store_true",
                    help="with --tune --decode-only: tune only the FP8 decode (and W1 shapes)")
    ap.add_argument("--quant-only", action="store_true",
                    help="issue 11's figures only: bf16 vs FP8 decode at >= 32 MB of KV and the "
                         "weight-quantised GEMMs at decode (M=1, 8, 32) and prefill (M=4096) rows")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1)")
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    res = dict(device=name, date=datetime.date.today().isoformat(), torch=torch.__version__,
               triton=triton.__version__, command="PYTHONPATH=. python benchmarks/kernels.py "
               + ("--smoke " if args.smoke else "") + ("--tune " if args.tune else "")
               + ("--decode-only" if args.decode_only else "")
               + ("--quant-only" if args.quant_only else ""))
    slug = "".join(c for c in name.lower().split(" ")[1] if c.isalnum()) if "NVIDIA" in name \
        else "cpu-smoke"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{slug}-{res['date']}" + ("-decode" if args.decode_only else "") \
        + ("-quant" if args.quant_only else "")

    def save() -> None:  # after every section, so a crash later keeps what was measured
        (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))

    t0 = time.time()
    if args.quant_only:
        res.update(quant_figures(device, args.smoke))
        save()
        md = markdown(res)
        (out_dir / f"{stem}.md").write_text(md)
        print(md)
        return
    res["correctness"] = [] if args.decode_only else check_correctness(device, args.smoke)
    save()
    print(f"[{time.time() - t0:.0f}s] correctness done", flush=True)
    res["copy"] = copy_bandwidth(device, args.smoke)
    res["copy_gbps"] = res["copy"]["roofline"]
    if args.tune:
        res["tune"] = tune(device, args.smoke, args.decode_only, args.fp8_only)
        save()
        print(f"[{time.time() - t0:.0f}s] tuning done", flush=True)
        for section, rows in res["tune"].items():
            for r in rows:
                print(section, {k: round(v, 1) if isinstance(v, float) else v
                                for k, v in r.items()})
    batches, ctxs = ([1, 2], [16, 40]) if args.smoke else ([1, 8, 32, 128, 256],
                                                           [128, 1024, 4096, 16384])
    res["decode"] = bench_decode(device, args.smoke, [(b, c) for b in batches for c in ctxs])
    print(f"[{time.time() - t0:.0f}s] decode done", flush=True)
    save()
    res["decode_fp8"] = bench_decode(device, args.smoke, [(b, c) for b in batches for c in ctxs],
                                     with_sdpa=False, kv_fp8=True)
    print(f"[{time.time() - t0:.0f}s] FP8 decode done", flush=True)
    save()
    res["prefill"] = []
    if not args.decode_only:
        lengths = [32, 64] if args.smoke else [512, 1024, 2048, 4096, 8192]
        res["prefill"] = bench_prefill(device, args.smoke, lengths)
        res["prefill"] += bench_prefill(device, args.smoke, lengths[-2:-1], dim=64)
        print(f"[{time.time() - t0:.0f}s] prefill done", flush=True)
        res["fp8_gemm"] = bench_fp8_gemm(device, args.smoke, res.get("copy_gbps"))

    save()
    md = markdown(res)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    bad = [r["check"] for r in res["correctness"] if not r["ok"]]
    if bad:
        raise SystemExit(f"correctness FAILED: {bad}")


def quant_figures(device: torch.device, smoke: bool) -> dict:
    """The sections issue 11 asks for: copy bandwidth, bf16 vs FP8 decode at W1-like shapes with
    at least 32 MB of KV read, and the weight-quantised GEMMs at decode and prefill rows."""
    res: dict = {"correctness": [], "prefill": []}
    res["copy"] = copy_bandwidth(device, smoke)
    res["copy_gbps"] = res["copy"]["roofline"]
    shapes = [(2, 40)] if smoke else [(32, 4096), (128, 1024), (128, 4096), (256, 1024),
                                      (256, 4096)]
    res["decode"] = bench_decode(device, smoke, shapes, with_sdpa=False)
    res["decode_fp8"] = bench_decode(device, smoke, shapes, with_sdpa=False, kv_fp8=True)
    res["fp8_gemm"] = bench_fp8_gemm(device, smoke, res["copy_gbps"],
                                     rows_list=None if smoke else [1, 8, 32, 4096])
    return res


# ----------------------------------------------------------------------------- FP8 / INT8 GEMM
# Qwen3-4B / Qwen3-8B linear layers as (name, N, K): fused qkv, o, fused gate/up, down.
GEMM_SHAPES = [("4b qkv", 6144, 2560), ("4b o", 2560, 4096), ("4b gate_up", 19456, 2560),
               ("4b down", 2560, 9728), ("8b qkv", 6144, 4096), ("8b o", 4096, 4096),
               ("8b gate_up", 24576, 4096), ("8b down", 4096, 12288)]


def bench_fp8_gemm(device: torch.device, smoke: bool, copy_gbps: float | None,
                   rows_list: list[int] | None = None) -> list[dict]:
    """Weight-quantised GEMMs vs bf16 ``F.linear`` at decode (M = 1..32) and prefill (M = 4096).

    Paths: ``bf16`` (cuBLAS); ``fp8_scaled_mm`` (W8A8: per-token activation quantisation, which
    is timed with it, + ``torch._scaled_mm`` with per-channel weight scales); ``fp8_wo`` /
    ``int8_wo`` (Triton weight-only: 8-bit weights dequantised in registers, bf16 activations);
    ``fp8_block_wo`` (the same kernel on Qwen's 128x128 block scales); at M=1 those are the GEMV
    kernel, and ``fp8_wo_dot`` is the tensor-core kernel on the same data for comparison. At decode the matmul
    streams the weights, so GB/s of weight bytes against copy bandwidth is the figure that
    matters; at prefill, TFLOP/s. ``rel_err``: against x @ (its dequantised weights)^T in float32
    (for W8A8 it includes the activation rounding, ~2.5 %; weight-only paths should be ~1e-3).
    Which path wins at which M sets ``fp8.WEIGHT_ONLY_MAX_ROWS``.
    """
    from minivllm.kernels.quant_gemm import weight_quant_gemm
    from minivllm.layers.quantization.formats import (FP8_E4M3, INT8, dequantize_blockwise,
                                                      quantize_blockwise)
    from minivllm.layers.quantization.fp8 import scaled_mm_per_channel

    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [("smoke", 256, 128)] if smoke else GEMM_SHAPES
    rows_list = rows_list or ([1, 32] if smoke else [1, 2, 4, 8, 16, 32, 4096])
    gen = torch.Generator(device=device).manual_seed(0)
    rows_out = []
    for name, n, k in shapes:
        w = torch.randn(n, k, device=device, generator=gen, dtype=torch.float32) * 0.02
        fp8_q, fp8_s = quantize_blockwise(w, FP8_E4M3, 1, k)
        blk_q, blk_s = quantize_blockwise(w, FP8_E4M3, 128, 128)
        int8_q, int8_s = quantize_blockwise(w, INT8, 1, k)
        w16 = w.to(dtype)
        refs = {"fp8": dequantize_blockwise(fp8_q, fp8_s, 1, k),
                "blk": dequantize_blockwise(blk_q, blk_s, 128, 128),
                "int8": dequantize_blockwise(int8_q, int8_s, 1, k)}
        for m in rows_list:
            x = torch.randn(m, k, device=device, generator=gen).to(dtype)
            paths = {
                "bf16": (lambda: F.linear(x, w16), w16, 2),
                "fp8_scaled_mm": (lambda: scaled_mm_per_channel(x, fp8_q, fp8_s), refs["fp8"], 1),
                "fp8_wo": (lambda: weight_quant_gemm(x, fp8_q, fp8_s, 1, k), refs["fp8"], 1),
                # At M=1 "fp8_wo" is the GEMV kernel; this is the tensor-core one on 16-row tiles.
                "fp8_wo_dot": (lambda: weight_quant_gemm(x, fp8_q, fp8_s, 1, k, kernel="dot"),
                               refs["fp8"], 1),
                "fp8_block_wo": (lambda: weight_quant_gemm(x, blk_q, blk_s, 128, 128), refs["blk"], 1),
                "int8_wo": (lambda: weight_quant_gemm(x, int8_q, int8_s, 1, k), refs["int8"], 1),
            }
            row = {"shape": name, "m": m, "n": n, "k": k}
            for path, (fn, ref_w, w_bytes) in paths.items():
                ref = x.float() @ ref_w.float().t()
                try:
                    out = fn().float()
                    ms = time_ms(fn, smoke)
                except Exception as e:  # e.g. _scaled_mm needs sm_89+: report, keep going
                    row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:200]
                    continue
                row[f"{path}_us"] = ms * 1e3
                row[f"{path}_tflops"] = 2 * m * n * k / (ms * 1e-3) / 1e12
                row[f"{path}_weight_gbps"] = n * k * w_bytes / (ms * 1e-3) / 1e9
                row[f"{path}_rel_err"] = ((out - ref).norm() / ref.norm()).item()
            rows_out.append(row)
    print(fp8_gemm_markdown(rows_out, copy_gbps), flush=True)
    return rows_out


GEMM_PATHS = ["bf16", "fp8_scaled_mm", "fp8_wo", "fp8_wo_dot", "fp8_block_wo", "int8_wo"]


def fp8_gemm_markdown(rows_out: list[dict], copy_gbps: float | None) -> str:
    """The weight-quantised GEMM table: decode rows as weight GB/s, prefill rows as TFLOP/s."""
    paths = GEMM_PATHS
    lines = ["## Weight-quantised GEMM (us; decode: weight GB/s and % of copy BW; prefill: TFLOP/s)",
             "", "| shape | M | " + " | ".join(paths) + " | best 8-bit vs bf16 |",
             "|---|---|" + "---|" * (len(paths) + 1)]
    for r in rows_out:
        cells = []
        for p in paths:
            us = r.get(f"{p}_us", math.nan)
            if r["m"] >= 1024:
                cells.append(f"{us:.0f} us, {r.get(f'{p}_tflops', math.nan):.0f} TF")
            else:
                gbps = r.get(f"{p}_weight_gbps", math.nan)
                frac = f" ({100 * gbps / copy_gbps:.0f}%)" if copy_gbps else ""
                cells.append(f"{us:.1f} us, {gbps:.0f} GB/s{frac}")
        best = min(r.get(f"{p}_us", math.inf) for p in paths[1:])
        lines.append(f"| {r['shape']} | {r['m']} | " + " | ".join(cells)
                     + f" | {r.get('bf16_us', math.nan) / best:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
