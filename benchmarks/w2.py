"""W2: one request, 128 random prompt ids, 256 greedy new tokens (``ignore_eos``).

    PYTHONPATH=. python benchmarks/latency.py --workload w2 --out DIR

For Qwen3-0.6B and Qwen3-4B shapes (random bf16 weights drawn by HF and shared): minivllm's
time to first token (a ``max_tokens=1`` run) and decode rate ``255 / (total - TTFT)``; the peer
is HF ``generate`` with a static cache (which transformers compiles), measured the same way.
Floor: one read of all weights per token at the measured copy bandwidth. Best of ``repeats``.

``--quantization fp8[,int8]`` also runs minivllm with those weight formats on the same weights
(quantised at load) and reports each one's decode rate, its speed-up over bf16 and its own
floor (8-bit linear weights, bf16 embeddings and LM head):

    PYTHONPATH=. python benchmarks/latency.py --workload w2 --w2-models qwen3-4b,qwen3-8b \
        --quantization fp8 --out benchmarks/results
"""

from __future__ import annotations

import datetime

import torch

from benchmarks.common import best_time_s, copy_bandwidth_gbs, shared_random_weights, write_results

MODELS = {"qwen3-0.6b": "benchmarks/models/qwen3-0.6b", "qwen3-4b": "benchmarks/models/qwen3-4b",
          "qwen3-8b": "benchmarks/models/qwen3-8b"}
PROMPT_LEN, NEW_TOKENS = 128, 256


def _quantized_weight_bytes(hf: torch.nn.Module) -> int:
    """Bytes read per token with 8-bit decoder linear weights (scales are < 1 %: ignored)."""
    return sum(p.numel() * (1 if "layers." in n and "_proj." in n else p.element_size())
               for n, p in hf.named_parameters())


def _decode_run(path, prompt: list[int], repeats: int, quantization: str | None,
                tp: int = 1) -> dict:
    from minivllm import LLM, SamplingParams

    llm = LLM(str(path), dtype="bfloat16", max_num_seqs=8, max_model_len=4096,
              gpu_memory_utilization=0.5, quantization=quantization, tensor_parallel_size=tp)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ttft = best_time_s(lambda: llm.generate([prompt], first, use_tqdm=False), repeats)
    total = best_time_s(lambda: llm.generate([prompt], full, use_tqdm=False), repeats)
    del llm
    torch.cuda.empty_cache()
    return {"decode_tok_s": (NEW_TOKENS - 1) / (total - ttft), "ttft_s": ttft, "total_s": total}


def _one_model(path: str, repeats: int, device: torch.device, bw_gbs: float,
               quantizations: tuple[str, ...] = (), tp: int = 1) -> dict:
    cfg, hf, tmp, weight_bytes = shared_random_weights(path, device, "minivllm-w2-")
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(2)).tolist()
    ours = _decode_run(tmp, prompt, repeats, None, tp)
    quantized = {}
    for quant in quantizations:
        run = _decode_run(tmp, prompt, repeats, quant, tp)
        q_bytes = _quantized_weight_bytes(hf)
        run.update(speedup_vs_bf16=run["decode_tok_s"] / ours["decode_tok_s"],
                   weight_bytes=q_bytes, floor_tok_s=bw_gbs * 1e9 / q_bytes)
        quantized[quant] = run

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
            "weight_bytes": weight_bytes, "quantized": quantized}


def run_w2(args) -> None:
    device = torch.device("cuda")
    bw = copy_bandwidth_gbs(device)
    models = {}
    quants = tuple(q for q in getattr(args, "quantization", "").split(",") if q)
    for name in args.w2_models.split(","):
        models[name] = _one_model(MODELS[name], args.repeats, device, bw, quants,
                                  getattr(args, "tensor_parallel_size", 1))
    res = {"benchmark": "w2", "device": torch.cuda.get_device_name(device),
           "date": datetime.date.today().isoformat(), "prompt_len": PROMPT_LEN,
           "new_tokens": NEW_TOKENS, "copy_bw_gbs": bw,
           "tensor_parallel_size": getattr(args, "tensor_parallel_size", 1), "models": models}
    rows = [f"| {name} | {m['minivllm']['decode_tok_s']:.0f} | {m['minivllm']['ttft_s'] * 1e3:.1f} ms | "
            f"{m['peer']['decode_tok_s']:.0f} | {m['minivllm']['decode_tok_s'] / m['peer']['decode_tok_s']:.2f}x | "
            f"{m['floor_tok_s']:.0f} |" for name, m in models.items()]
    table = ("| model | minivllm decode tok/s | TTFT | HF static+compile tok/s | ratio | floor tok/s |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows) + f"\n\ndevice: {res['device']}")
    quant_rows = [f"| {name} | {q} | {m['minivllm']['decode_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
                  f"{r['speedup_vs_bf16']:.2f}x | {r['floor_tok_s']:.0f} |"
                  for name, m in models.items() for q, r in m["quantized"].items()]
    if quant_rows:
        table += ("\n\n| model | weights | bf16 decode tok/s | quantised decode tok/s | speed-up | "
                  "quantised floor tok/s |\n|---|---|---|---|---|---|\n" + "\n".join(quant_rows))
    tp = getattr(args, "tensor_parallel_size", 1)
    write_results(args.out, "w2" + (f"-tp{tp}" if tp > 1 else ""), res, table)
