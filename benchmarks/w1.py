"""W1: the offline workload nano-vllm's ``bench.py`` made the standard for small engines.

    PYTHONPATH=. python benchmarks/throughput.py --workload w1 --model benchmarks/models/qwen3-0.6b
    ... --kv-cache-dtype fp8      # the KV cache in float8 e4m3 (twice the blocks, half the bytes)

256 prompts of ``randint(100, 1024)`` random ids (``randint(0, 10000)``), then 256 sampling
settings (temperature 0.6, ``ignore_eos``, ``max_tokens=randint(100, 1024)``), prompts first,
from one ``random.seed(0)`` stream; ``max_model_len=4096``. One warm-up ``generate`` of a
single short prompt, then the timed run (**cold**: the first in a fresh process), then a second
timed run on other prompts of the same distribution (**warm**: no prefix hits), then a third
under the torch profiler for the GPU-busy fraction (sum of kernel times / wall time).
The peer is HF transformers' continuous batching (``generate_batch``) on the same weights, on a
subset of the prompts (it is ~20x slower), one ``max_new_tokens`` for all (its API has no
per-request limit): the subset's mean.
"""

from __future__ import annotations

import datetime
import random
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.common import copy_bandwidth_gbs, shared_random_weights, write_results

NUM_PROMPTS = 256
MAX_MODEL_LEN = 4096


def w1_batch(rng: random.Random, num_prompts: int = NUM_PROMPTS):
    """``(prompts, max_tokens)`` of one W1 batch: prompts first, then params, one stream."""
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
               for _ in range(num_prompts)]
    max_tokens = [rng.randint(100, 1024) for _ in range(num_prompts)]
    return prompts, max_tokens


def _params(max_tokens: list[int]):
    from minivllm import SamplingParams

    return [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]


def _timed_generate(llm, prompts, max_tokens) -> tuple[float, int]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, _params(max_tokens), use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if n_out != sum(max_tokens):
        raise RuntimeError(f"expected {sum(max_tokens)} output tokens, got {n_out}")
    return wall, n_out


def _kernel_times(prof) -> dict[str, float]:
    """GPU seconds per kernel name in a profile (memcpy/memset excluded: not compute)."""
    per_name: dict[str, float] = {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            name = evt.name.lower()
            if "memcpy" in name or "memset" in name:
                continue
            us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
            per_name[evt.name] = per_name.get(evt.name, 0.0) + us / 1e6
    return per_name


def _top_kernels(per_name: dict[str, float], n: int = 15) -> dict[str, float]:
    """The ``n`` kernels with the most GPU time (names cut to 80 characters): where W1 goes."""
    top = sorted(per_name.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return {name[:80]: round(sec, 4) for name, sec in top}


def _peer_hf(hf, prompts, max_tokens, device) -> dict:
    from transformers.generation import GenerationConfig

    new_tokens = round(sum(max_tokens) / len(max_tokens))
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           temperature=0.6, eos_token_id=-1, pad_token_id=0)
    hf.generate_batch(inputs=[p[:16] for p in prompts[:2]],
                      generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                                                         eos_token_id=-1, pad_token_id=0),
                      progress_bar=False)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = hf.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    n_out = sum(len(r.generated_tokens) for r in out.values())
    return {"name": "transformers generate_batch (continuous batching)", "output_tok_s": n_out / wall,
            "num_prompts": len(prompts), "max_new_tokens": new_tokens, "output_tokens": n_out,
            "wall_s": wall}


def run_w1(args) -> None:
    from minivllm import LLM

    device = torch.device("cuda")
    rng = random.Random(0)
    random.seed(0)
    cold_batch = w1_batch(rng)
    warm_batch = w1_batch(rng)
    prof_batch = w1_batch(rng)
    cfg, hf, tmp, weight_bytes = shared_random_weights(args.model, device, "minivllm-w1-")
    hf.to("cpu")  # out of the way of minivllm's memory profiling; back for the peer run
    torch.cuda.empty_cache()

    t = time.perf_counter()
    kv_cache_dtype = getattr(args, "kv_cache_dtype", "auto")
    tp = getattr(args, "tensor_parallel_size", 1)
    llm = LLM(str(tmp), dtype="bfloat16", max_model_len=MAX_MODEL_LEN, seed=0,
              enforce_eager=args.enforce_eager, kv_cache_dtype=kv_cache_dtype,
              tensor_parallel_size=tp)
    startup_s = time.perf_counter() - t
    llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]], _params([8]), use_tqdm=False)  # the one warm-up
    cold_s, cold_tokens = _timed_generate(llm, *cold_batch)
    warm_s, warm_tokens = _timed_generate(llm, *warm_batch)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prof_s, prof_tokens = _timed_generate(llm, *prof_batch)
    per_kernel = _kernel_times(prof)
    kernel_s = sum(per_kernel.values())
    top_kernels = _top_kernels(per_kernel)
    for name, sec in top_kernels.items():
        print(f"  {sec:8.3f} s  {name}")
    stats = llm.stats()
    del llm
    torch.cuda.empty_cache()

    peer = {"name": "transformers generate_batch", "output_tok_s": None}
    if args.hf_prompts:
        hf.to(device)
        try:
            peer = _peer_hf(hf, cold_batch[0][:args.hf_prompts], cold_batch[1][:args.hf_prompts],
                            device)
        except Exception as e:  # noqa: BLE001 - the peer's failure must not lose our numbers
            peer["error"] = f"{type(e).__name__}: {e}"

    bw = copy_bandwidth_gbs(device)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_elem_bytes = 1 if kv_cache_dtype == "fp8" else 2  # the floor moves with the KV bytes
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * kv_elem_bytes
    floor_s = _w1_floor_seconds(cold_batch, weight_bytes, kv_per_token, bw)
    res = {
        "benchmark": "w1", "device": torch.cuda.get_device_name(device),
        "date": datetime.date.today().isoformat(), "git_commit": _git_commit(),
        "model": args.model, "weights": "random (HF init, seed 0), bf16",
        "minivllm": {
            "output_tok_s_cold": cold_tokens / cold_s, "output_tok_s_warm": warm_tokens / warm_s,
            "gpu_busy_frac": kernel_s / prof_s, "startup_s": startup_s,
            "cold_s": cold_s, "warm_s": warm_s, "profiled_s": prof_s, "kernel_s": kernel_s,
            "output_tokens_cold": cold_tokens, "num_preemptions": stats["num_preemptions"],
            "num_kv_blocks": stats["num_kv_blocks"], "enforce_eager": args.enforce_eager,
            "kv_cache_dtype": kv_cache_dtype,
            "tensor_parallel_size": tp, "top_kernels_s": top_kernels,
        },
        "peer": peer,
        "floor_output_tok_s": cold_tokens / floor_s, "copy_bw_gbs": bw, "weight_bytes": weight_bytes,
    }
    ours = res["minivllm"]
    ratio = (f"{ours['output_tok_s_warm'] / peer['output_tok_s']:.1f}x"
             if peer.get("output_tok_s") else "n/a")
    table = ("| device | cold tok/s | warm tok/s | GPU busy | start-up | HF CB tok/s (subset) | ratio (warm) "
             "| floor tok/s |\n|---|---|---|---|---|---|---|---|\n"
             f"| {res['device']} | {ours['output_tok_s_cold']:.0f} | {ours['output_tok_s_warm']:.0f} | "
             f"{ours['gpu_busy_frac']:.0%} | {startup_s:.1f} s | "
             f"{peer['output_tok_s'] or float('nan'):.0f} | {ratio} | {res['floor_output_tok_s']:.0f} |")
    write_results(args.out, "w1" + ("-kvfp8" if kv_cache_dtype == "fp8" else "")
                  + (f"-tp{tp}" if tp > 1 else ""), res, table)


def _w1_floor_seconds(batch, weight_bytes: int, kv_per_token: int, bw_gbs: float) -> float:
    """Every decode step reads all weights once plus the live KV of every running request.

    Simulated at the batch level: all requests decode together from the start (the floor
    ignores prefill), and the batch shrinks as each one reaches its ``max_tokens``."""
    prompts, max_tokens = batch
    order = sorted(range(len(prompts)), key=lambda i: max_tokens[i])
    total_bytes = 0.0
    done_steps = 0
    live = list(order)
    prompt_kv = sum(len(prompts[i]) for i in live)
    for i in order:
        steps = max_tokens[i] - done_steps
        if steps > 0:
            # KV read over these steps: prompts + generated-so-far of the live requests.
            n = len(live)
            gen_kv = n * (done_steps * steps + steps * (steps - 1) / 2)
            total_bytes += steps * weight_bytes + (prompt_kv * steps + gen_kv) * kv_per_token
            done_steps = max_tokens[i]
        live.remove(i)
        prompt_kv -= len(prompts[i])
    return total_bytes / (bw_gbs * 1e9)


def _git_commit() -> str:
    """HEAD, or ``$MINIVLLM_GIT_COMMIT`` where the tree travelled without its ``.git``."""
    import os

    if os.environ.get("MINIVLLM_GIT_COMMIT"):
        return os.environ["MINIVLLM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
