"""Cost of prompt logprobs: prefill throughput with and without ``SamplingParams(prompt_logprobs=N)``.

    PYTHONPATH=. python benchmarks/prompt_logprobs.py --model benchmarks/models/qwen3-0.6b \
        --num-prompts 64 --input-len 1000 --prompt-logprobs 5

Every prompt is distinct random token ids (no prefix-cache hits either way: requests with prompt
logprobs skip the lookup), one generated token each, so the run is prefill. Both runs use one
engine, after a warm-up of each kind. Printed: prompt tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from minivllm import LLM, SamplingParams


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--prompt-logprobs", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below this")
    args = ap.parse_args()

    llm = LLM(args.model, load_format=args.load_format, device=args.device)
    plain = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=args.prompt_logprobs)
    llm.generate(_prompts(4, args.input_len, args.vocab, 0), plain, use_tqdm=False)
    llm.generate(_prompts(4, args.input_len, args.vocab, 1), scored, use_tqdm=False)
    rates = {}
    for seed, (name, params) in enumerate([("plain", plain), ("prompt_logprobs", scored)], start=2):
        prompts = _prompts(args.num_prompts, args.input_len, args.vocab, seed)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        if params.prompt_logprobs is not None:
            assert all(len(o.prompt_logprobs) == args.input_len for o in outs)
        rates[name] = args.num_prompts * args.input_len / elapsed
        print(f"{name:>16}: {elapsed:7.3f} s  {rates[name]:10.0f} prompt tok/s")
    print(f"prompt_logprobs={args.prompt_logprobs} costs {rates['plain'] / rates['prompt_logprobs']:.2f}x "
          "the plain prefill time")


if __name__ == "__main__":
    main()
