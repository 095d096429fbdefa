"""Owns the model, its KV cache and the sampler on one device; runs one step at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.attention.metadata import AttentionMetadata
from minivllm.attention.selector import get_attention_backend
from minivllm.config import ModelArchConfig
from minivllm.engine.request import Request
from minivllm.engine.scheduler import SchedulerOutput
from minivllm.layers.sampler import Sampler
from minivllm.models.loader import load_model
from minivllm.runner.cuda_graphs import DecodeGraphRunner, capture_sizes
from minivllm.runner.input_batch import build_model_inputs
from minivllm.runner.sampling_state import SamplingState

CPU_KV_CACHE_BYTES = 1 << 30  # CPU has no memory profiler worth trusting: a fixed, modest cap
GIB = 1 << 30


@dataclass
class StepResult:
    """Sampled tokens for the requests that completed their sequence this step."""

    requests: list[Request]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    sampled_logprobs: list[float | None]


class ModelRunner:
    """Input preparation, forward pass and sampling for one device."""

    def __init__(self, *, model_dir, arch: ModelArchConfig, device: torch.device, dtype: torch.dtype,
                 load_format: str, seed: int, attention_backend: str, max_position: int) -> None:
        self.arch = arch
        self.device = device
        self.dtype = dtype
        torch.manual_seed(seed)
        self.backend = get_attention_backend(attention_backend, device, arch.head_dim)
        self.model = load_model(arch, model_dir, self.backend, device, dtype, load_format, seed,
                                max_position)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.sampler = Sampler(gen)
        self.sampling_state = SamplingState(device, arch.vocab_size)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.decode_graphs: DecodeGraphRunner | None = None

    # ---- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        a = self.arch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * a.num_hidden_layers * block_size * a.num_key_value_heads * a.head_dim * elem

    def auto_num_blocks(self, block_size: int, gpu_memory_utilization: float,
                        max_num_batched_tokens: int) -> int:
        """Blocks that fit: on CUDA in ``gpu_memory_utilization`` of the card after weights and
        an activation reserve; on CPU in a fixed 1 GiB."""
        per_block = self.kv_bytes_per_block(block_size)
        if self.device.type != "cuda":
            return max(CPU_KV_CACHE_BYTES // per_block, 1)
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

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        a = self.arch
        shape = (num_blocks, block_size, a.num_key_value_heads, a.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(a.num_hidden_layers)]
        self.block_size = block_size

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture pure-decode CUDA graphs (needs the KV cache allocated). Only the Triton
        backend is capturable: the torch reference sizes its work from host values."""
        if self.device.type != "cuda" or self.backend.name != "triton":
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
        if not force and (self.device.type != "cuda" or self.backend.name != "triton"):
            return
        longest = min(max_num_batched_tokens, max_model_len - 1)
        lengths = sorted({min(2 ** i, longest) for i in range(1, 9)} | {longest})
        for n in (n for n in lengths if n >= 2):
            num_blocks = -(-n // self.block_size)
            meta = AttentionMetadata(
                slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
                block_tables=torch.zeros((1, num_blocks), dtype=torch.int32, device=self.device),
                max_query_len=n, max_seq_len=n,
                query_start_loc_cpu=torch.tensor([0, n], dtype=torch.int32),
                seq_lens_cpu=torch.tensor([n], dtype=torch.int32), num_actual_tokens=n)
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            positions = torch.arange(n, dtype=torch.int64, device=self.device)
            hidden = self.model(ids, positions, self.kv_caches, meta)
            self.model.compute_logits(hidden[-1:]).argmax(dim=-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- the step ------------------------------------------------------------------------
    def remove_request(self, request_id: str) -> None:
        self.sampling_state.remove(request_id)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Run the scheduled tokens through the model and sample for completed sequences."""
        inputs = build_model_inputs(sched, self.block_size, self.device)
        if self.decode_graphs is not None and self.decode_graphs.can_run(inputs):
            hidden = self.decode_graphs.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        reqs = [sched.requests[i] for i in inputs.sampling_rows]
        if not reqs:
            return StepResult([], [], [], [])
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        md = self.sampling_state.build(reqs)
        out = self.sampler(logits, md)
        # The one device→host sync of the step.
        token_ids = out.sampled_token_ids.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(reqs)
        sampled_lp: list[float | None] = [None] * len(reqs)
        if out.sampled_logprobs is not None:
            sampled = out.sampled_logprobs.tolist()
            top_ids = out.topk_token_ids.tolist() if out.topk_token_ids is not None else None
            top_lp = out.topk_logprobs.tolist() if out.topk_logprobs is not None else None
            for i, req in enumerate(reqs):
                if req.params.logprobs is None:
                    continue
                sampled_lp[i] = sampled[i]
                n = req.params.logprobs
                entry = dict(zip(top_ids[i][:n], top_lp[i][:n])) if n and top_ids else {}
                entry[token_ids[i]] = sampled[i]
                logprobs[i] = entry
        return StepResult(reqs, token_ids, logprobs, sampled_lp)
