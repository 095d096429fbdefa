"""W2: one request, 128 random prompt ids, 256 greedy new tokens (``ignore_eos``).

    PYTHONPATH=. python benchmarks/latency.py --workload w2 --out DIR

For Qwen3-0.6B and Qwen3-4B shapes (random bf16 weights drawn by HF and shared): minivllm's
time to first token (a ``max_tokens=1`` run) and decode rate ``255 / (total - TTFT)``; the peer
is HF ``generate`` with a static cache (which transformers compiles), measured the same way.
Floor: one read of all weights per token at the measured copy bandwidth. Best of ``repeats``.
"""

from __future__ import annotations

import datetime

import torch

from benchmarks.common import best_time_s, copy_bandwidth_gbs, shared_random_weights, write_results

MODELS = {"qwen3-0.6b": "benchmarks/models/qwen3-0.6b", "qwen3-4b": "benchmarks/models/qwen3-4b"}
PROMPT_LEN, NEW_TOKENS = 128, 256


def _one_model(path: str, repeats: int, device: torch.device, bw_gbs: float) -> dict:
    from minivllm import LLM, SamplingParams

    cfg, hf, tmp, weight_bytes = shared_random_weights(path, device, "minivllm-w2-")
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(2)).tolist()
    llm = LLM(str(tmp), dtype="bfloat16", max_num_seqs=8, max_model_len=4096,
              gpu_memory_utilization=0.5)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ttft = best_time_s(lambda: llm.generate([prompt], first, use_tqdm=False), repeats)
    total = best_time_s(lambda: llm.generate([prompt], full, use_tqdm=False), repeats)
    ours = {"decode_tok_s": (NEW_TOKENS - 1) / (total - ttft), "ttft_s": ttft, "total_s": total}
    del llm
    torch.cuda.empty_cache()

    ids = torch.tensor([prompt], device=device)
    hf.generation_config.cache_implementation = "static"

    def hf_run(n: int):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)

    hf_run(NEW_TOKENS)  # compiles
    hf_ttft = best_time_s(lambda: hf_run(1), repeats)
    hf_total = best_time_s(lambda: hf_run(NEW_TOKENS), repeats)
    peer = {"name": "HF generate, static cache (compiled)",
            "decode_tok_s": (NEW_TOKENS - 1) / (hf_total - hf_ttft), "ttft_s": hf_ttft,
            "total_s": hf_total}
    del hf
    torch.cuda.empty_cache()
    return {"minivllm": ours, "peer": peer, "floor_tok_s": bw_gbs * 1e9 / weight_bytes,
            "weight_bytes": weight_bytes}


def run_w2(args) -> None:
    device = torch.device("cuda")
    bw = copy_bandwidth_gbs(device)
    models = {}
    for name in args.w2_models.split(","):
        models[name] = _one_model(MODELS[name], args.repeats, device, bw)
    res = {"benchmark": "w2", "device": torch.cuda.get_device_name(device),
           "date": datetime.date.today().isoformat(), "prompt_len": PROMPT_LEN,
           "new_tokens": NEW_TOKENS, "copy_bw_gbs": bw, "models": models}
    rows = [f"| {name} | {m['minivllm']['decode_tok_s']:.0f} | {m['minivllm']['ttft_s'] * 1e3:.1f} ms | "
            f"{m['peer']['decode_tok_s']:.0f} | {m['minivllm']['decode_tok_s'] / m['peer']['decode_tok_s']:.2f}x | "
            f"{m['floor_tok_s']:.0f} |" for name, m in models.items()]
    table = ("| model | minivllm decode tok/s | TTFT | HF static+compile tok/s | ratio | floor tok/s |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows) + f"\n\ndevice: {res['device']}")
    write_results(args.out, "w2", res, table)
