"""Single-request decode latency: minivllm (CUDA graphs and eager) vs HF transformers ``generate``.

    PYTHONPATH=. python benchmarks/latency.py --model benchmarks/models/qwen3-0.6b --out DIR

Same random bf16 weights for all (HF draws them, saves, minivllm loads). One prompt of
``--input-len`` random tokens, exactly ``--output-len`` greedy tokens; best of ``--repeats``.
The floor is one read of all weights per token at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from benchmarks.common import best_time_s, copy_bandwidth_gbs, shared_random_weights, write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workload", choices=["fixed", "w2"], default="fixed",
                    help="w2: 128 in / 256 out on qwen3-0.6b and qwen3-4b, see benchmarks/w2.py")
    ap.add_argument("--w2-models", default="qwen3-0.6b,qwen3-4b")
    ap.add_argument("--quantization", default="",
                    help="comma-separated weight formats (fp8, int8) to run next to bf16 on the "
                         "same weights, e.g. --quantization fp8")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="minivllm on this many GPUs (the HF peer stays on one)")
    args = ap.parse_args()
    if args.workload == "w2":
        from benchmarks.w2 import run_w2

        run_w2(args)
        return

    from minivllm import LLM, SamplingParams

    device = torch.device("cuda")
    cfg, hf, tmp, weight_bytes = shared_random_weights(args.model, device, "minivllm-lat-")
    prompt = torch.randint(0, cfg.vocab_size, (args.input_len,), generator=torch.Generator().manual_seed(2))
    n = args.output_len

    def best_of(fn) -> float:
        return best_time_s(fn, args.repeats)

    res = {"device": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
           "model": args.model, "input_len": args.input_len, "output_len": n}
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    runs = [("minivllm_graphs", False, None), ("minivllm_eager", True, None)]
    runs += [(f"minivllm_{q}_graphs", False, q) for q in args.quantization.split(",") if q]
    for name, eager, quant in runs:
        llm = LLM(str(tmp), dtype="bfloat16", enforce_eager=eager, max_num_seqs=8, max_model_len=4096,
                  quantization=quant)
        res[f"{name}_tok_s"] = n / best_of(lambda llm=llm: llm.generate([prompt.tolist()], params, use_tqdm=False))
        del llm
        torch.cuda.empty_cache()
    ids = prompt[None].to(device)
    with torch.no_grad():
        res["hf_tok_s"] = n / best_of(lambda: hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0))
    bw = copy_bandwidth_gbs(device)
    res["copy_bw_gbs"] = bw
    res["floor_tok_s"] = 1 / (weight_bytes / (bw * 1e9))  # bw: total bytes moved per second
    res["ratio_graphs_vs_hf"] = res["minivllm_graphs_tok_s"] / res["hf_tok_s"]
    table = ("| device | in/out | minivllm graphs tok/s | minivllm eager tok/s | HF tok/s | ratio (graphs/HF) | floor tok/s |\n"
             "|---|---|---|---|---|---|---|\n"
             f"| {res['device']} | {args.input_len}/{n} | {res['minivllm_graphs_tok_s']:.0f} | "
             f"{res['minivllm_eager_tok_s']:.0f} | {res['hf_tok_s']:.0f} | {res['ratio_graphs_vs_hf']:.2f}x | "
             f"{res['floor_tok_s']:.0f} |")
    for key in [k for k in res if k.startswith("minivllm_") and k.endswith("_graphs_tok_s")]:
        if key != "minivllm_graphs_tok_s":
            table += f"\n\n{key}: {res[key]:.0f} tok/s ({res[key] / res['minivllm_graphs_tok_s']:.2f}x bf16 graphs)"
    write_results(args.out, "latency", res, table)


if __name__ == "__main__":
    main()
