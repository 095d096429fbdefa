"""Random paged batches for kernel tests and benchmarks (shared so both check the same thing).

A batch is a list of ``(seq_len, query_len)`` pairs: the first ``seq_len - query_len`` positions
of each request are already in the cache (a cached prefix), the last ``query_len`` are this
step's new tokens. Blocks are handed out from a shuffled pool, so block tables are neither
sorted nor contiguous, and the whole cache starts as random data (never zeros: an unwritten or
misaddressed row must change the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.attention.metadata import AttentionMetadata
from minivllm.attention.torch_ref import TorchReferenceBackend


@dataclass
class PagedBatch:
    """Inputs of one attention call plus the metadata describing them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_paged_batch(
    seqs: list[tuple[int, int]], *, block_size: int, num_kv_heads: int, group: int,
    head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
    num_padding_tokens: int = 0, spare_blocks: int = 3, extra_table_cols: int = 1,
    generator: torch.Generator | None = None,
) -> PagedBatch:
    """Build a random batch; ``num_padding_tokens`` rows with slot ``-1`` trail the real ones."""
    device = torch.device(device)
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(blocks_per_seq, default=0) + extra_table_cols
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    slots, start = [], 0
    for i, ((seq_len, query_len), n) in enumerate(zip(seqs, blocks_per_seq)):
        if not 0 <= query_len <= seq_len:
            raise ValueError(f"bad (seq_len, query_len) = {(seq_len, query_len)}")
        block_tables[i, :n] = perm[start:start + n].to(torch.int32)
        start += n
        for pos in range(seq_len - query_len, seq_len):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    num_tokens = len(slots) + num_padding_tokens
    slot_mapping = torch.tensor(slots + [-1] * num_padding_tokens, dtype=torch.int64)
    query_lens = torch.tensor([ql for _, ql in seqs], dtype=torch.int32)
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(query_lens, 0)
    seq_lens = torch.tensor([sl for sl, _ in seqs], dtype=torch.int32)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    num_heads = num_kv_heads * group
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device), query_start_loc=query_start_loc.to(device),
        seq_lens=seq_lens.to(device), block_tables=block_tables.to(device),
        max_query_len=int(query_lens.max()) if len(seqs) else 0,
        max_seq_len=int(seq_lens.max()) if len(seqs) else 0,
        query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens,
        num_actual_tokens=len(slots))
    return PagedBatch(q=randn(num_tokens, num_heads, head_dim),
                      k=randn(num_tokens, num_kv_heads, head_dim),
                      v=randn(num_tokens, num_kv_heads, head_dim),
                      k_cache=randn(*cache_shape), v_cache=randn(*cache_shape),
                      meta=meta, scale=head_dim ** -0.5)


def reference_output(batch: PagedBatch, dtype: torch.dtype = torch.float32,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-reference output and caches after the step, computed on copies in ``dtype``."""
    k_cache = batch.k_cache.to(dtype).clone()
    v_cache = batch.v_cache.to(dtype).clone()
    out = TorchReferenceBackend().forward(
        batch.q.to(dtype), batch.k.to(dtype), batch.v.to(dtype), k_cache, v_cache, batch.meta,
        batch.scale)
    return out, k_cache, v_cache


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives ``inf`` (never passes)."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# ||out - ref|| / ||ref|| allowed against the float32 torch reference, per kernel dtype.
# float32 (interpreter: exact float32 math; CUDA: IEEE dots) lands near 1e-7. float16 output
# rounding alone is ~2.4e-4 per element (~2e-4 seen). bfloat16 keeps 8 mantissa bits (~3e-3).
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def quantize_batch_caches(batch: PagedBatch, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Turn ``batch``'s caches into FP8 (e4m3) ones holding ``cache / scale``, in place."""
    from minivllm.attention.kv_cache import quantize_fp8

    batch.k_cache = quantize_fp8(batch.k_cache, k_scale)
    batch.v_cache = quantize_fp8(batch.v_cache, v_scale)


def fp8_reference_output(batch: PagedBatch, k_scale: torch.Tensor,
                         v_scale: torch.Tensor) -> torch.Tensor:
    """The torch reference over copies of ``batch``'s FP8 caches, float32 queries."""
    return TorchReferenceBackend().forward(
        batch.q.float(), batch.k.float(), batch.v.float(), batch.k_cache.clone(),
        batch.v_cache.clone(), batch.meta, batch.scale, k_scale, v_scale)


def run_paged_kernels(batch: PagedBatch, kind: str, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None,
                      num_splits: int | None = None, decode_config=None) -> torch.Tensor:
    """Store the step's K/V, then run the Triton ``"decode"`` or ``"prefill"`` kernel; its
    output (``NaN`` where it wrote nothing). ``decode_config``: a ``DecodeConfig`` (default:
    the kernel's)."""
    from minivllm.kernels.kv_store import store_kv
    from minivllm.kernels.paged_decode import paged_decode_attention
    from minivllm.kernels.paged_prefill import paged_prefill_attention

    m = batch.meta
    store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping, k_scale, v_scale)
    out = torch.full_like(batch.q, float("nan"))
    if kind == "decode":
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                               m.query_start_loc, m.block_tables, m.max_seq_len, batch.scale,
                               num_splits=num_splits, k_scale=k_scale, v_scale=v_scale,
                               config=decode_config)
    elif kind == "prefill":
        paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                                m.query_start_loc, m.block_tables, m.max_query_len,
                                batch.scale, k_scale=k_scale, v_scale=v_scale)
    else:
        raise ValueError(f"kind must be 'decode' or 'prefill', got {kind!r}")
    return out
