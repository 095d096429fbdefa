"""Single-prompt generation speed: minivllm vs HF transformers ``generate``, same weights, same run.

    python benchmarks/cpu_generate_vs_hf.py [--model PATH] [--max-tokens 64] [--device cpu]

Both decode greedily for exactly ``--max-tokens`` tokens (EOS ignored) from the same chat prompt;
each side runs once to warm up, then ``--repeats`` timed runs; the best is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default="Tell me a short story about a dragon who learns to bake bread.")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from minivllm import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    msgs = [{"role": "user", "content": args.prompt}]
    hf = AutoModelForCausalLM.from_pretrained(str(llm.config.model_dir), dtype=torch.float32).to(args.device).eval()

    def run_ours() -> tuple[float, list[int], list[int]]:
        t = time.perf_counter()
        out = llm.chat(msgs, params, use_tqdm=False)[0]
        return time.perf_counter() - t, out.prompt_token_ids, out.outputs[0].token_ids

    def run_hf(prompt_ids: list[int]) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt_ids], device=args.device)
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                              min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, out[0, len(prompt_ids):].tolist()

    _, prompt_ids, ours_ids = run_ours()
    run_hf(prompt_ids)
    ours_t, hf_t = [], []
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        ours_t.append(run_ours()[0])
        dt, hf_ids = run_hf(prompt_ids)
        hf_t.append(dt)
    n = args.max_tokens
    res = {
        "device": args.device, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "prompt_tokens": len(prompt_ids), "new_tokens": n,
        "minivllm_tok_s": n / min(ours_t), "hf_tok_s": n / min(hf_t),
        "same_greedy_ids": ours_ids == hf_ids, "torch": torch.__version__,
    }
    res["ratio"] = res["minivllm_tok_s"] / res["hf_tok_s"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"| minivllm {res['minivllm_tok_s']:.1f} tok/s | HF generate {res['hf_tok_s']:.1f} tok/s | "
          f"ratio {res['ratio']:.2f}x | identical ids: {res['same_greedy_ids']} |")


if __name__ == "__main__":
    main()
