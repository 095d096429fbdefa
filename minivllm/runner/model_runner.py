"""Owns the model, its KV cache and the sampler on one device; runs one step at a time."""

from __future__ import annotations

import gc
import logging

import torch

from minivllm.attention.kv_cache import LayerKVCache, resolve_kv_cache_dtype
from minivllm.attention.metadata import AttentionMetadata
from minivllm.attention.selector import get_attention_backend
from minivllm.config import ModelArchConfig
from minivllm.distributed.group import TensorParallelGroup, tp_rank_and_size
from minivllm.distributed.sharding import kv_cache_heads_per_rank
from minivllm.engine.scheduler_output import SchedulerOutput
from minivllm.layers.sampler import LogitBias, Sampler, SamplingMetadata
from minivllm.models.loader import load_model
from minivllm.pooling.pooler import Pooler
from minivllm.runner.cuda_graphs import DecodeGraphRunner, capture_sizes
from minivllm.runner.input_batch import InputBatch, PreviousSample
from minivllm.runner.prompt_logprobs import PromptLogprobsRows
from minivllm.runner.step_handle import StepHandle

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # CPU has no memory profiler worth trusting: a fixed, modest cap
GIB = 1 << 30


class ModelRunner:
    """Input preparation, forward pass and sampling for one device."""

    def __init__(self, *, model_dir, arch: ModelArchConfig, device: torch.device, dtype: torch.dtype,
                 load_format: str, seed: int, attention_backend: str, max_position: int,
                 tp_group: TensorParallelGroup | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto",
                 calculate_kv_scales: bool = False) -> None:
        """``tp_group``: this runner is one tensor-parallel rank; it holds that rank's shard of
        the weights and of the KV cache (its KV heads). Every rank samples identically.
        ``quantization``: the resolved weight format (``EngineConfig.quantization``).
        ``kv_cache_dtype``: ``auto`` (model dtype) or ``fp8`` (e4m3, per-layer K/V scales: 1.0,
        or from the first step's amax with ``calculate_kv_scales``)."""
        self.arch = arch
        self.tp_group = tp_group
        self.num_kv_cache_heads = kv_cache_heads_per_rank(arch, tp_rank_and_size(tp_group)[1])
        self.device = device
        self.dtype = dtype
        torch.manual_seed(seed)
        self.backend = get_attention_backend(attention_backend, device, arch.head_dim)
        self.backend.check_kv_cache_dtype(kv_cache_dtype, device)
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_cache_torch_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        # Until the first real step has set them (FP8 with calculate_kv_scales only).
        self.kv_scales_pending = calculate_kv_scales and kv_cache_dtype == "fp8"
        self.model = load_model(arch, model_dir, self.backend, device, dtype, load_format, seed,
                                max_position, tp_group=tp_group, quantization=quantization)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.sampler = Sampler(gen)
        self.pooler = Pooler(self.model)  # classify/embed requests (idle for generative models)
        self.prompt_logprobs = PromptLogprobsRows()  # requests that asked for prompt logprobs
        self.max_position = max_position
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        self.input_batch: InputBatch | None = None
        self.prev_sample: PreviousSample | None = None
        self.decode_graphs: DecodeGraphRunner | None = None

    # ---- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block over all layers, K and V (1 byte per element for FP8)."""
        a = self.arch
        elem = torch.tensor([], dtype=self.kv_cache_torch_dtype).element_size()
        return 2 * a.num_hidden_layers * block_size * self.num_kv_cache_heads * a.head_dim * elem

    def auto_num_blocks(self, block_size: int, gpu_memory_utilization: float,
                        max_num_batched_tokens: int) -> int:
        """Blocks that fit: on CUDA in ``gpu_memory_utilization`` of the card after weights and
        an activation reserve; on CPU in a fixed 1 GiB."""
        per_block = self.kv_bytes_per_block(block_size)
        if self.device.type != "cuda":
            return max(CPU_KV_CACHE_BYTES // per_block, 1)
        # Memory a previous engine in this process left behind (its tensors unreachable but not
        # yet collected, or cached by the allocator) would otherwise count as taken.
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        a = self.arch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        # Peak activations of one step, generously: a few hidden/MLP-sized buffers per token,
        # plus float32 logits for up to max_num_seqs rows (bounded by the token budget).
        act = max_num_batched_tokens * (4 * a.hidden_size + 3 * a.intermediate_size) * elem
        act += min(max_num_batched_tokens, 1024) * a.vocab_size * 4 * 3
        budget = free - (1 - gpu_memory_utilization) * total - act - GIB // 2
        if budget < per_block:
            raise ValueError("not enough GPU memory for the KV cache; raise gpu_memory_utilization "
                             "or lower max_num_batched_tokens")
        return int(budget // per_block)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_num_seqs: int,
                          max_model_len: int) -> None:
        """The paged KV cache and the persistent batch whose block tables index it."""
        self.input_batch = InputBatch(max_num_seqs, -(-max_model_len // block_size), block_size,
                                      self.arch.vocab_size, self.device)
        a = self.arch
        shape = (num_blocks, block_size, self.num_kv_cache_heads, a.head_dim)
        fp8 = self.kv_cache_dtype == "fp8"

        def layer_cache() -> LayerKVCache:
            k, v = (torch.zeros(shape, dtype=self.kv_cache_torch_dtype, device=self.device)
                    for _ in range(2))
            if not fp8:
                return LayerKVCache(k, v)
            # Per layer, per K/V; the kernels read them through a pointer (graph-safe updates).
            k_scale, v_scale = (torch.ones(1, dtype=torch.float32, device=self.device)
                                for _ in range(2))
            return LayerKVCache(k, v, k_scale, v_scale)

        self.kv_caches = [layer_cache() for _ in range(a.num_hidden_layers)]
        self.block_size = block_size
        if fp8:
            model_elem = torch.tensor([], dtype=self.dtype).element_size()
            logger.info("KV cache in fp8 e4m3: %d blocks (%d tokens) in %.2f GiB, %dx the "
                        "blocks of %s in the same memory; scales %s", num_blocks,
                        num_blocks * block_size, num_blocks * self.kv_bytes_per_block(block_size)
                        / GIB, model_elem, str(self.dtype).removeprefix("torch."),
                        "from the first step's amax" if self.kv_scales_pending else "1.0")

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture pure-decode CUDA graphs (needs the KV cache allocated). Only the Triton
        backend is capturable: the torch reference sizes its work from host values."""
        if self.device.type != "cuda" or not self.backend.supports_cuda_graphs:
            return
        self.decode_graphs = DecodeGraphRunner(
            self.model, self.kv_caches, capture_sizes(max_num_seqs),
            max_model_len, self.block_size, self.device, self.dtype)

    @torch.inference_mode()
    def warm_up_prefill(self, max_num_batched_tokens: int, max_model_len: int,
                        force: bool = False) -> None:
        """Run the prefill path once per query-length bucket of the Triton prefill kernel (its
        tile shrinks for short queries) and once at the full token budget, so Triton compiles
        before the first request instead of during it. Writes nothing to the KV cache: every
        slot is ``-1``. Only on CUDA with the Triton backend, unless ``force`` (tests)."""
        if not force and (self.device.type != "cuda" or not self.backend.compiles_per_shape):
            return
        longest = min(max_num_batched_tokens, max_model_len - 1)
        # The block table's row stride is a kernel argument Triton specialises on (== 1,
        # divisible by 16): warm with the persistent batch's width, which every step uses.
        table_width = self.input_batch.block_table_dev.shape[1]
        lengths = sorted({min(2 ** i, longest) for i in range(1, 9)} | {longest})
        for n in (n for n in lengths if n >= 2):
            meta = AttentionMetadata(
                slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
                block_tables=torch.zeros((1, table_width), dtype=torch.int32, device=self.device),
                max_query_len=n, max_seq_len=n,
                query_start_loc_cpu=torch.tensor([0, n], dtype=torch.int32),
                seq_lens_cpu=torch.tensor([n], dtype=torch.int32), num_actual_tokens=n)
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            positions = torch.arange(n, dtype=torch.int64, device=self.device)
            hidden = self.model(ids, positions, self.kv_caches, meta)
            self.model.compute_logits(hidden[-1:]).argmax(dim=-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warm_up_sampler(self, max_num_seqs: int) -> None:
        """Run every sampler path once (greedy, temperature with top-k/top-p/min-p, penalties,
        logit bias, bans, logprobs) at a small and the largest batch, on random logits: their
        kernels load at start-up rather than inside the first request that needs them. CUDA only."""
        if self.device.type != "cuda":
            return
        dev, vocab = self.device, self.arch.vocab_size
        gen = torch.Generator(device=dev)
        gen.manual_seed(0)
        for batch in sorted({1, max_num_seqs}):
            logits = torch.randn(batch, vocab, device=dev, generator=gen)

            def col(value: float, dtype=torch.float32) -> torch.Tensor:
                return torch.full((batch,), value, dtype=dtype, device=dev)

            variants = [
                SamplingMetadata(None, None, None, None, True, False, False, False,
                                 [None] * batch, -1),
                SamplingMetadata(col(0.7), col(0, torch.int64), col(1.0), col(0.0), False, False,
                                 False, False, [None] * batch, -1),
                SamplingMetadata(col(0.7), col(20, torch.int64), col(0.9), col(0.05), False, True,
                                 True, True, [gen] + [None] * (batch - 1), 5),
            ]
            penalised = variants[0]
            penalised.repetition_penalty, penalised.presence_penalty = col(1.1), col(0.1)
            penalised.frequency_penalty = col(0.1)
            penalised.prompt_mask = torch.zeros(batch, vocab, dtype=torch.bool, device=dev)
            penalised.output_counts = torch.zeros(batch, vocab, device=dev)
            penalised.banned_mask = torch.zeros(batch, vocab, dtype=torch.bool, device=dev)
            rows = torch.arange(batch, device=dev)
            penalised.logit_bias = LogitBias(rows, rows, torch.zeros(batch, device=dev))
            for md in variants:
                out = self.sampler(logits, md)
                out.sampled_token_ids.to("cpu", non_blocking=True)
        torch.cuda.synchronize(dev)

    # ---- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> StepHandle:
        """Launch one step and return at once; ``result()`` of the handle waits for it.

        On CUDA the forward pass and the sampler are only enqueued here, and the sampled ids
        are copied back asynchronously, so the caller can schedule the next step meanwhile.
        """
        batch = self.input_batch
        for rid in step.finished_req_ids:
            batch.remove(rid)
        for new in step.new_requests:
            batch.add(new)
        for rid, block_ids in step.new_block_ids.items():
            batch.append_blocks(rid, block_ids)
        self.pooler.update(step)
        self.prompt_logprobs.update(step)
        if step.is_empty:
            return StepHandle.empty()
        inputs = batch.prepare(step, self.prev_sample)
        if self.kv_scales_pending and inputs.meta.num_actual_tokens > 0:
            inputs.meta.calculate_kv_scales = True  # the first real step sets the FP8 scales
            self.kv_scales_pending = False
        if (self.decode_graphs is not None and self.decode_graphs.can_run(inputs)
                and not inputs.meta.calculate_kv_scales):
            hidden = self.decode_graphs.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        pooled = self.pooler.pool(step, inputs.meta, hidden) if self.pooler.active else None
        if pooled is not None:  # classify/embed engines: no request samples
            self.prev_sample = None
            return pooled.attach(StepHandle.empty())
        plp = (self.prompt_logprobs.compute(step, hidden, self.model.compute_logits)
               if self.prompt_logprobs.active else None)
        if not len(inputs.sample_rows):
            self.prev_sample = None
            return StepHandle.empty(plp)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        md = batch.sampling.metadata(inputs.sample_rows, inputs.sample_rows_dev)
        out = self.sampler(logits, md)
        batch.sampling.record_sampled(inputs.sample_rows, inputs.sample_rows_dev,
                                      out.sampled_token_ids)
        req_ids = [step.req_ids[i] for i in step.sampling_rows]
        self.prev_sample = PreviousSample(out.sampled_token_ids,
                                          {rid: i for i, rid in enumerate(req_ids)})
        wanted = [batch.sampling.num_logprobs[r] for r in inputs.sample_rows.tolist()]
        return StepHandle(req_ids, out, wanted, self.device, plp)
