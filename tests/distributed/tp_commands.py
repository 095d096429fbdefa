"""Commands the tests run on every rank of a WorkerGroup (module level: workers import them).

Each takes the rank's ``WorkerContext`` first. The references here are written independently
of ``minivllm.layers``: they slice HF-named full tensors by hand.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from minivllm.attention.kv_cache import LayerKVCache
from minivllm.attention.metadata import AttentionMetadata
from minivllm.attention.torch_ref import TorchReferenceBackend
from minivllm.config import ModelArchConfig
from minivllm.models.loader import load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 16


# ---- reference slicing --------------------------------------------------------------------
def expected_shard(name: str, full: torch.Tensor, arch: ModelArchConfig, rank: int,
                   world: int) -> torch.Tensor:
    """This rank's part of an HF-named full tensor, by hand (the oracle for the loader)."""
    d, h, kv = arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads
    if "embed_tokens" in name or "lm_head" in name:
        per = -(-arch.vocab_size // world)
        out = torch.zeros(per, *full.shape[1:], dtype=full.dtype)
        rows = full[rank * per:(rank + 1) * per]
        out[:rows.shape[0]] = rows
        return out
    if ".q_proj." in name:
        per = h // world
        return full[rank * per * d:(rank + 1) * per * d]
    if ".k_proj." in name or ".v_proj." in name:
        if kv >= world:
            per = kv // world
            return full[rank * per * d:(rank + 1) * per * d]
        q_head = rank * (h // world)  # the KV head this rank's first query head uses
        kv_head = q_head // (h // kv)
        return full[kv_head * d:(kv_head + 1) * d]
    if ".o_proj." in name or ".down_proj." in name:
        per = full.shape[1] // world
        return full[:, rank * per:(rank + 1) * per]
    if ".gate_proj." in name or ".up_proj." in name:
        per = full.shape[0] // world
        return full[rank * per:(rank + 1) * per]
    return full  # norms: replicated


def our_name_parts(hf_name: str) -> tuple[str, int | None]:
    """Our (fused) parameter name and part index for an HF tensor name."""
    name = hf_name.removeprefix("model.")
    for frag, fused, idx in ((".q_proj.", ".qkv_proj.", 0), (".k_proj.", ".qkv_proj.", 1),
                             (".v_proj.", ".qkv_proj.", 2), (".gate_proj.", ".gate_up_proj.", 0),
                             (".up_proj.", ".gate_up_proj.", 1)):
        if frag in name:
            return name.replace(frag, fused), idx
    return name, None


def expected_params(hf: dict[str, torch.Tensor], arch: ModelArchConfig, rank: int,
                    world: int) -> dict[str, torch.Tensor]:
    """Our parameter name → expected local tensor, fused parts concatenated in order."""
    parts: dict[str, dict[int | None, torch.Tensor]] = {}
    for hf_name, full in hf.items():
        if hf_name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        name, idx = our_name_parts(hf_name)
        parts.setdefault(name, {})[idx] = expected_shard(hf_name, full, arch, rank, world)
    return {n: torch.cat([p[i] for i in sorted(p)]) if None not in p else p[None]
            for n, p in parts.items()}


def hf_names_of(params: dict[str, torch.Tensor], arch: ModelArchConfig) -> dict[str, torch.Tensor]:
    """A TP=1 model's parameters split back into HF-named full tensors."""
    d = arch.head_dim
    out = {}
    for name, t in params.items():
        if ".qkv_proj." in name:
            sizes = [arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.num_key_value_heads * d]
            for frag, piece in zip(("q_proj", "k_proj", "v_proj"), t.split(sizes)):
                out[name.replace("qkv_proj", frag)] = piece
        elif ".gate_up_proj." in name:
            for frag, piece in zip(("gate_proj", "up_proj"), t.chunk(2)):
                out[name.replace("gate_up_proj", frag)] = piece
        else:
            out[name] = t
    return out


def _load(ctx, model_dir: str, load_format: str = "safetensors", tp: bool = True):
    arch = ModelArchConfig.from_dir(Path(model_dir))
    model = load_model(arch, Path(model_dir), TorchReferenceBackend(), torch.device("cpu"),
                       torch.float32, load_format, seed=3, max_position=256,
                       tp_group=ctx.tp_group if tp else None)
    return arch, model


def check_sharded_loading(ctx, model_dir: str) -> list[str]:
    """Mismatches between this rank's loaded parameters and hand-sliced checkpoint tensors."""
    from safetensors.torch import load_file

    arch, model = _load(ctx, model_dir)
    hf = load_file(str(Path(model_dir) / "model.safetensors"))
    want = expected_params(hf, arch, ctx.rank, ctx.world_size)
    got = {n: p.detach() for n, p in model.named_parameters()}
    errors = [f"names differ: {sorted(set(got) ^ set(want))}"] if set(got) != set(want) else []
    errors += [f"{n}: {tuple(got[n].shape)} vs {tuple(want[n].shape)}" for n in sorted(set(got) & set(want))
               if got[n].shape != want[n].shape or not torch.equal(got[n], want[n])]
    return errors


def check_dummy_loading(ctx, model_dir: str) -> list[str]:
    """Mismatches between this rank's dummy shard and the sliced TP=1 dummy model."""
    arch, model = _load(ctx, model_dir, "dummy")
    _, full = _load(ctx, model_dir, "dummy", tp=False)
    hf = hf_names_of({n: p.detach() for n, p in full.named_parameters()}, arch)
    want = expected_params(hf, arch, ctx.rank, ctx.world_size)
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), want[n])]


# ---- a few engine-like steps over a paged KV cache ------------------------------------------
# Two sequences; each step lists (tokens already cached, new token ids) per sequence.
# Step 1: prefill A + first chunk of B; step 2: decode A + rest of B; steps 3-4: decode both.
STEPS = [
    [(0, [5, 17, 300, 42, 8]), (0, [7, 7, 9, 100])],
    [(5, [11]), (4, [250, 3, 64])],
    [(6, [90]), (7, [2])],
    [(7, [401]), (8, [33])],
]
BLOCK_TABLES = [[3, 1, 6], [0, 5, 2]]


def step_metadata(step, block_tables=BLOCK_TABLES, block_size: int = BLOCK_SIZE):
    """Hand-built metadata for one step (as the model runner builds it)."""
    ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
    for (cached, new), table in zip(step, block_tables):
        for j, tok in enumerate(new):
            pos = cached + j
            ids.append(tok)
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + len(new))
        seq_lens.append(cached + len(new))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(block_tables, dtype=torch.int32),
        max_query_len=max(len(n) for _, n in step), max_seq_len=max(seq_lens),
        query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32), num_actual_tokens=len(ids))
    return torch.tensor(ids), torch.tensor(positions), meta


def run_steps(ctx, model_dir: str, tp: bool = True) -> list[torch.Tensor]:
    """Logits of every token of every step in STEPS, on this rank."""
    arch, model = _load(ctx, model_dir, tp=tp)
    heads = model.num_local_kv_heads
    shape = (NUM_BLOCKS, BLOCK_SIZE, heads, arch.head_dim)
    kv = [LayerKVCache(torch.zeros(shape), torch.zeros(shape))
          for _ in range(arch.num_hidden_layers)]
    out = []
    with torch.inference_mode():
        for step in STEPS:
            ids, pos, meta = step_metadata(step)
            out.append(model.compute_logits(model(ids, pos, kv, meta)))
    return out


# ---- failure injection ----------------------------------------------------------------------
def raise_on_rank1(ctx) -> int:
    if ctx.rank == 1:
        raise KeyError("injected failure on rank 1")
    return ctx.rank


def killed_mid_collective(ctx) -> None:
    """Rank 1 dies while rank 0 waits in an all-reduce."""
    if ctx.rank == 1:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    ctx.tp_group.all_reduce(torch.ones(8))


def collectives(ctx) -> tuple[float, list, float]:
    """One of each collective with rank-dependent inputs."""
    s = ctx.tp_group.all_reduce(torch.tensor([ctx.rank + 1.0])).item()
    g = ctx.tp_group.all_gather(torch.full((2, 1), float(ctx.rank)), dim=-1).tolist()
    b = ctx.tp_group.broadcast(torch.tensor([10.0 * ctx.rank + 5])).item()
    return s, g, b


# ---- NCCL + CUDA graphs (GPU only) -----------------------------------------------------------
def decode_graph_vs_eager(ctx, model_dir: str) -> tuple[float, float]:
    """Max |graph - eager| and |TP - TP=1| of a decode step's logits on this rank (bf16, Triton).

    Prefills STEPS[0] eagerly, then captures the decode forward of STEPS[2] (its all-reduces
    included) in a CUDA graph and replays it over the KV cache that prefill filled.
    """
    from minivllm.attention.selector import get_attention_backend

    dev = ctx.device
    arch = ModelArchConfig.from_dir(Path(model_dir))
    backend = get_attention_backend("triton", dev, arch.head_dim)

    def build(tp_group):
        return load_model(arch, Path(model_dir), backend, dev, torch.bfloat16, "safetensors", 0,
                          256, tp_group=tp_group)

    def moved(ids, pos, meta):
        fields = {k: (v.to(dev) if isinstance(v, torch.Tensor) and not k.endswith("_cpu") else v)
                  for k, v in vars(meta).items()}
        return ids.to(dev), pos.to(dev), AttentionMetadata(**fields)

    def run(model, capture: bool):
        shape = (NUM_BLOCKS, BLOCK_SIZE, model.num_local_kv_heads, arch.head_dim)
        kv = [LayerKVCache(torch.zeros(shape, dtype=torch.bfloat16, device=dev),
                           torch.zeros(shape, dtype=torch.bfloat16, device=dev))
              for _ in range(arch.num_hidden_layers)]
        with torch.inference_mode():
            model(*moved(*step_metadata(STEPS[0])), kv)  # prefill (eager)
            # STEPS[2] is a decode step of both sequences once STEPS[1] ran: run STEPS[1] too.
            model(*moved(*step_metadata(STEPS[1])), kv)
            ids, pos, meta = moved(*step_metadata(STEPS[2]))
            if not capture:
                return model.compute_logits(model(ids, pos, kv, meta))
            snapshot = [(k.clone(), v.clone()) for k, v in kv]
            model(ids, pos, kv, meta)  # warm-up: compiles kernels, creates NCCL communicators
            for (k, v), (k0, v0) in zip(kv, snapshot):
                k.copy_(k0)
                v.copy_(v0)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                hidden = model(ids, pos, kv, meta)
            for (k, v), (k0, v0) in zip(kv, snapshot):
                k.copy_(k0)
                v.copy_(v0)
            graph.replay()
            torch.cuda.synchronize()
            return model.compute_logits(hidden)

    model = build(ctx.tp_group)
    eager, graphed = run(model, False), run(model, True)
    full = run(build(None), False)
    return (eager - graphed).abs().max().item(), (eager - full).abs().max().item()
