"""Pure-decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a small model is launch-bound: hundreds of tiny kernels whose launch costs
more than their work. Capturing the model forward once per batch size and replaying it turns
that into one launch. The graphs read their inputs from static buffers; a step of ``n``
sequences copies its inputs into the first ``n`` rows and pads up to the captured size with
rows that write nowhere (slot ``-1``) and attend to nothing (``seq_len`` 0).

The attention metadata of a graph uses a static ``max_seq_len`` cap (the model's
``max_model_len``) and block tables as wide as that cap, so the same graph serves any context.
``use_graphs=False`` runs the very same padded buffers eagerly: that is how CPU tests check the
padding logic, and what a non-capturable backend would do.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.attention.kv_cache import LayerKVCache
from minivllm.attention.metadata import AttentionMetadata
from minivllm.runner.input_batch import ModelInputs

KVCaches = list[LayerKVCache]


def capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    """Batch sizes to capture: fine-grained where decode batches are small, coarser above."""
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top]
    sizes += list(range(16, min(top, 64) + 1, 8)) + list(range(80, top + 1, 16))
    if not sizes or sizes[-1] < top:
        sizes.append(top)
    return sorted(set(sizes))


class DecodeGraphRunner:
    """Static decode buffers plus one captured forward per batch size in ``sizes``."""

    def __init__(self, model: nn.Module, kv_caches: KVCaches, sizes: list[int],
                 max_model_len: int, block_size: int, device: torch.device, dtype: torch.dtype,
                 use_graphs: bool = True) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.max_batch_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.use_graphs = use_graphs
        n, width = self.max_batch_size, -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, width), dtype=torch.int32, device=device)
        # One query token per row, padded rows included: row i is token i.
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if use_graphs:
            self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32),
            seq_lens_cpu=torch.zeros(bs, dtype=torch.int32), num_actual_tokens=bs)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        # Largest first: later, smaller graphs fit in the memory pool the first one reserved.
        for bs in reversed(self.sizes):
            self._forward(bs)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, inputs: ModelInputs) -> bool:
        meta = inputs.meta
        return meta.max_query_len == 1 and meta.num_seqs <= self.max_batch_size

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` for a pure-decode step of ``n <= max_batch_size`` rows.

        The result lives in graph memory: use it before the next call.
        """
        meta = inputs.meta
        n = meta.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:  # padding rows: write nowhere, attend to nothing
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(0)
        if not self.use_graphs:
            return self._forward(bs)[:n]
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
