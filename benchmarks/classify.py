"""Sequence classification: minivllm (packed, prefill-only) vs HF transformers (fp16, padded
batches of 32), same weights, same run, same GPU.

    PYTHONPATH=. python benchmarks/classify.py --out benchmarks/results      # GPU
    PYTHONPATH=. python benchmarks/classify.py --smoke                        # tiny, CPU, seconds

A Qwen2-1.5B-shaped ``Qwen2ForSequenceClassification`` (2 labels) gets random fp16 weights from
HF (seed 0), saved once; both engines load that directory. 1,000 prompts of random token ids
(no pad/special ids) with lengths uniform in [32, 512]:

- offline: all prompts at once. minivllm packs them into token-budget steps with no padding;
  HF runs batches of 32 in input order, each right-padded to its longest prompt (what
  ``tokenizer(..., padding=True)`` does). samples/s, and the p50/p95 of each prompt's
  completion time since the batch started.
- concurrency 1: one prompt at a time (``--c1-prompts`` of another draw, so minivllm gets no
  prefix-cache hits from the offline run); HF without padding. p50/p95 latency per prompt.

Printed last: a table with both, the ratio, and the compute floor (2 x non-embedding params x
tokens + causal attention, at the measured fp16 matmul rate). Also checked: the two engines'
probabilities agree (max abs difference, argmax agreement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (best of 5), the compute roofline of prefill."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def _tiny_config_dir() -> str:
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                      num_labels=2, pad_token_id=0, architectures=["Qwen2ForSequenceClassification"])
    path = tempfile.mkdtemp(prefix="minivllm-cls-smoke-cfg-")
    cfg.save_pretrained(path)
    return path


def shared_classifier(config_dir: str, device: torch.device, dtype: torch.dtype):
    """HF classifier with random weights (seed 0) and a directory holding them."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype).eval()
    tmp = Path(tempfile.mkdtemp(prefix="minivllm-cls-"))
    hf.save_pretrained(tmp)
    return cfg, hf, tmp


def random_prompts(n: int, lo: int, hi: int, vocab: int, special_from: int, seed: int) -> list[list[int]]:
    """``n`` prompts, lengths uniform in [lo, hi], ids below ``special_from`` (never the pad id)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(1, special_from, size=int(k)).tolist() for k in lengths]


def _stats(latencies_s: list[float], total_s: float, n: int) -> dict[str, float]:
    lat = np.asarray(latencies_s)
    return {"samples_s": n / total_s, "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95)), "total_s": total_s}


# ---- minivllm ----------------------------------------------------------------------------------
def minivllm_offline(llm, prompts: list[list[int]], device: torch.device) -> tuple[dict, list[list[float]]]:
    """``LLM.classify`` on everything (samples/s), then the same through the engine core step by
    step to time each prompt's completion (p50/p95)."""
    from minivllm.engine.input_processor import ProcessedPrompt
    from minivllm.pooling.frontend import PoolingFrontend
    from minivllm.pooling_params import PoolingParams

    _sync(device)
    t = time.perf_counter()
    outs = llm.classify(prompts, use_tqdm=False)
    _sync(device)
    total_s = time.perf_counter() - t
    probs = [o.outputs.probs for o in outs]

    llm.engine.block_manager.reset_prefix_cache()  # the timed pass must not hit the first one
    params, now = PoolingParams(pooling_type="last"), time.time()
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        llm.engine.add_request(PoolingFrontend.make_request(f"lat-{i}", ProcessedPrompt(None, p), params, now))
    done: list[float] = []
    while llm.engine.has_unfinished:
        step = llm.engine.step()
        now_s = time.perf_counter() - t
        done += [now_s for o in step.outputs if o.pooled is not None]
    res = _stats(done, total_s, len(prompts))
    res["step_loop_total_s"] = time.perf_counter() - t
    return res, probs


def minivllm_c1(llm, prompts: list[list[int]], device: torch.device) -> dict:
    lat = []
    t0 = time.perf_counter()
    for p in prompts:
        _sync(device)
        t = time.perf_counter()
        llm.classify([p], use_tqdm=False)
        lat.append(time.perf_counter() - t)
    return _stats(lat, time.perf_counter() - t0, len(prompts))


# ---- HF transformers ---------------------------------------------------------------------------
@torch.no_grad()
def hf_offline(hf, prompts: list[list[int]], batch: int, pad_id: int,
               device: torch.device) -> tuple[dict, list[list[float]]]:
    probs, done = [], []
    _sync(device)
    t = time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for i, p in enumerate(chunk):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        probs += torch.softmax(logits.float(), -1).cpu().tolist()  # syncs: the batch is done
        done += [time.perf_counter() - t] * len(chunk)
    return _stats(done, time.perf_counter() - t, len(prompts)), probs


@torch.no_grad()
def hf_c1(hf, prompts: list[list[int]], device: torch.device) -> dict:
    lat = []
    t0 = time.perf_counter()
    for p in prompts:
        _sync(device)
        t = time.perf_counter()
        torch.softmax(hf(input_ids=torch.tensor([p], device=device)).logits.float(), -1).cpu()
        lat.append(time.perf_counter() - t)
    return _stats(lat, time.perf_counter() - t0, len(prompts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen2-1.5b-cls")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--c1-prompts", type=int, default=200, help="prompts timed one at a time")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU in float32: a check that it runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from minivllm import LLM

    if args.smoke:
        device, dtype, model = torch.device("cpu"), torch.float32, _tiny_config_dir()
        args.num_prompts, args.min_len, args.max_len = min(args.num_prompts, 16), 4, 40
        args.hf_batch, args.c1_prompts = min(args.hf_batch, 4), min(args.c1_prompts, 4)
    else:
        device, dtype, model = torch.device("cuda"), torch.float16, args.model
    cfg, hf, tmp = shared_classifier(model, device, dtype)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    # Ids below every special token (Qwen2's start at 151643), never the pad id.
    special_from = min(cfg.vocab_size, 151643)
    prompts = random_prompts(args.num_prompts, args.min_len, args.max_len, special_from, special_from, 1)
    c1_prompts = random_prompts(args.c1_prompts, args.min_len, args.max_len, special_from, special_from, 2)
    warm = random_prompts(64, args.min_len, args.max_len, special_from, special_from, 3)
    num_tokens = sum(len(p) for p in prompts)

    # ---- minivllm ----
    llm = LLM(str(tmp), dtype=dtype, device=device, max_model_len=max(args.max_len, 64), seed=0,
              num_kv_blocks=256 if args.smoke else None)
    backend = llm.engine.executor.attention_backend_name
    llm.classify(warm, use_tqdm=False)
    llm.classify(warm[:1], use_tqdm=False)
    ours_off, ours_probs = minivllm_offline(llm, prompts, device)
    ours_c1 = minivllm_c1(llm, c1_prompts, device)
    del llm
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- HF transformers ----
    hf_offline(hf, warm[:args.hf_batch], args.hf_batch, pad_id, device)  # warm-up
    hf_c1(hf, warm[:2], device)
    peer_off, hf_probs = hf_offline(hf, prompts, args.hf_batch, pad_id, device)
    peer_c1 = hf_c1(hf, c1_prompts, device)

    a, b = np.asarray(ours_probs), np.asarray(hf_probs)
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    max_diff = float(np.abs(a - b).max())

    # Floor: every useful token through every non-embedding weight (2 FLOPs per MAC) plus
    # causal attention (QK^T and PV over half of an L x L square, per layer and head).
    params = sum(p.numel() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = sum(2 * len(p) ** 2 for p in prompts) * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
    flops = 2 * params * num_tokens + attn
    tflops = matmul_tflops(device, dtype)
    floor_samples_s = args.num_prompts / (flops / (tflops * 1e12))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {
        "benchmark": "classify", "device": device_name, "date": datetime.date.today().isoformat(),
        "model": "tiny (smoke)" if args.smoke else args.model,
        "weights": f"random (HF init, seed 0), {str(dtype).removeprefix('torch.')}",
        "backend": backend, "num_prompts": args.num_prompts, "prompt_len": [args.min_len, args.max_len],
        "num_prompt_tokens": num_tokens, "hf_batch": args.hf_batch, "c1_prompts": args.c1_prompts,
        # Headline (the targets): samples/s offline, latency at concurrency 1.
        "minivllm": {"samples_s": ours_off["samples_s"], "p50_s": ours_c1["p50_s"], "p95_s": ours_c1["p95_s"],
                     "offline": ours_off, "concurrency_1": ours_c1},
        "peer": {"name": f"HF transformers, padded batches of {args.hf_batch}",
                 "samples_s": peer_off["samples_s"], "p50_s": peer_c1["p50_s"], "p95_s": peer_c1["p95_s"],
                 "offline": peer_off, "concurrency_1": peer_c1},
        "ratio_samples_s": ours_off["samples_s"] / peer_off["samples_s"],
        "probs_max_abs_diff": max_diff, "argmax_agree_frac": agree,
        "matmul_tflops": tflops, "prefill_flops": flops, "floor_samples_s": floor_samples_s,
    }
    mo, po, mc, pc = ours_off, peer_off, ours_c1, peer_c1
    table = (
        "| device | engine | offline samples/s | offline p50 / p95 s | c=1 p50 / p95 ms | floor samples/s |\n"
        "|---|---|---|---|---|---|\n"
        f"| {device_name} | minivllm | {mo['samples_s']:.1f} | {mo['p50_s']:.2f} / {mo['p95_s']:.2f} | "
        f"{mc['p50_s'] * 1e3:.1f} / {mc['p95_s'] * 1e3:.1f} | {floor_samples_s:.0f} |\n"
        f"| {device_name} | HF {res['weights'].split(', ')[-1]}, batch {args.hf_batch} padded | {po['samples_s']:.1f} | "
        f"{po['p50_s']:.2f} / {po['p95_s']:.2f} | {pc['p50_s'] * 1e3:.1f} / {pc['p95_s'] * 1e3:.1f} | |\n\n"
        f"ratio (offline samples/s): {res['ratio_samples_s']:.2f}x; minivllm at "
        f"{mo['samples_s'] / floor_samples_s:.0%} of the compute floor ({tflops:.0f} TFLOP/s measured); "
        f"probs max |diff| {max_diff:.2e}, argmax agree {agree:.3f}")
    if args.smoke:
        print(json.dumps(res, indent=2))
        print(table)
        return
    write_results(args.out, "classify", res, table)


if __name__ == "__main__":
    main()
