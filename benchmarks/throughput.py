"""Offline throughput: minivllm vs HF transformers ``generate``, same weights, same run.

    PYTHONPATH=. python benchmarks/throughput.py --model benchmarks/models/qwen3-0.6b \
        --num-prompts 256 --input-len 256 --output-len 128 --out results_dir
    PYTHONPATH=. python benchmarks/throughput.py --workload w1 --out results_dir   # see w1.py

Random weights are drawn once by HF from ``config.json`` and saved; both engines load that
directory, so they compute with identical weights. Prompts are random token ids of equal length
(HF needs no padding then), EOS is ignored, both decode greedily for exactly ``--output-len``.
HF runs static batches of ``--hf-batch`` prompts; minivllm gets all prompts at once.

Printed last: a table with tokens/s of each, the ratio, and the decode roofline floor
(weights + KV read once per step at the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from benchmarks.common import copy_bandwidth_gbs, shared_random_weights, write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-prompts", type=int, default=None, help="HF runs on this many (default all)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="minivllm's KV cache: model dtype (auto) or float8 e4m3 (fp8)")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="minivllm on this many GPUs (the HF peer stays on one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workload", choices=["fixed", "w1"], default="fixed",
                    help="fixed: --num-prompts x --input-len/--output-len greedy; w1: see benchmarks/w1.py")
    args = ap.parse_args()
    if args.workload == "w1":
        from benchmarks.w1 import run_w1

        if args.hf_prompts is None:
            args.hf_prompts = 32
        run_w1(args)
        return

    from minivllm import LLM, SamplingParams

    device = torch.device("cuda")
    cfg, hf, tmp, weight_bytes = shared_random_weights(args.model, device, "minivllm-bench-")

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (args.num_prompts, args.input_len), generator=g)
    n_out = args.output_len

    # ---- minivllm ----
    llm = LLM(str(tmp), dtype="bfloat16", enforce_eager=args.enforce_eager, seed=0,
              kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    # Warm-up at the timed run's shapes (a full token budget of prefill, then decode), on other
    # prompts so that the timed run gets no prefix-cache hits from it.
    warm = torch.randint(0, cfg.vocab_size, (64, args.input_len), generator=torch.Generator().manual_seed(9))
    llm.generate([p.tolist() for p in warm], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([p.tolist() for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    ours_s = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == n_out for o in outs)
    ours_ids = [o.outputs[0].token_ids for o in outs]
    backend = type(llm.engine.executor.runner.backend).__name__
    del llm
    torch.cuda.empty_cache()

    # ---- HF transformers ----
    hf_n = args.hf_prompts or args.num_prompts
    hf_ids = []
    with torch.no_grad():
        warm = prompts[:2].to(device)
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, hf_n, args.hf_batch):
            batch = prompts[s:s + args.hf_batch].to(device)
            out = hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n_out,
                              min_new_tokens=n_out, do_sample=False, pad_token_id=0)
            hf_ids += out[:, args.input_len:].tolist()
        torch.cuda.synchronize()
        hf_s = time.perf_counter() - t

    agree = sum(a[:8] == b[:8] for a, b in zip(ours_ids, hf_ids)) / len(hf_ids)
    bw = copy_bandwidth_gbs(device)
    # Decode floor: every step reads all weights once plus the batch's KV (mid-generation length).
    kv_elem_bytes = 1 if args.kv_cache_dtype == "fp8" else 2
    kv_per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads
                    * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
                    * kv_elem_bytes)
    mean_ctx = args.input_len + n_out / 2
    step_bytes = weight_bytes + args.num_prompts * mean_ctx * kv_per_token
    # Copy bandwidth counts bytes read + written: it is the memory's total byte rate, the
    # same rate a read-only stream (decode) can reach.
    floor_tok_s = args.num_prompts / (step_bytes / (bw * 1e9))
    res = {
        "device": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
        "model": args.model, "weights": "random (HF init, seed 0), bf16", "backend": backend,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": n_out,
        "minivllm_s": ours_s, "minivllm_out_tok_s": args.num_prompts * n_out / ours_s,
        "minivllm_total_tok_s": args.num_prompts * (args.input_len + n_out) / ours_s,
        "hf_prompts": hf_n, "hf_batch": args.hf_batch, "hf_s": hf_s,
        "hf_out_tok_s": hf_n * n_out / hf_s,
        "first8_tokens_agree_frac": agree, "copy_bw_gbs": bw, "weight_bytes": weight_bytes,
        "decode_floor_out_tok_s": floor_tok_s, "enforce_eager": args.enforce_eager,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    res["ratio_out_tok_s"] = res["minivllm_out_tok_s"] / res["hf_out_tok_s"]
    table = (f"| device | prompts x in/out | minivllm out tok/s | HF out tok/s (batch {args.hf_batch}) | ratio "
             f"| decode floor tok/s | first-8 agree |\n|---|---|---|---|---|---|---|\n"
             f"| {res['device']} | {args.num_prompts} x {args.input_len}/{n_out} | "
             f"{res['minivllm_out_tok_s']:.0f} | {res['hf_out_tok_s']:.0f} | {res['ratio_out_tok_s']:.2f}x | "
             f"{floor_tok_s:.0f} | {agree:.2f} |")
    kind = "throughput" + ("-kvfp8" if args.kv_cache_dtype == "fp8" else "")
    write_results(args.out, kind, res, table)


if __name__ == "__main__":
    main()
