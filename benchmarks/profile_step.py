"""Where a step's time goes: host phases (schedule / execute / update) and the top GPU kernels.

    PYTHONPATH=. python benchmarks/profile_step.py --num-prompts 256 --input-len 256 --output-len 64

Random weights (load_format="dummy") from a config directory; CUDA only.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()

    from minivllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16")
    core, runner = llm.engine, llm.engine.runner
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 151936, (args.num_prompts, args.input_len), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up

    phases: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    orig_schedule, orig_execute, orig_update = core.scheduler.schedule, runner.execute, core.scheduler.update_after_step

    def timed(name, fn):
        def wrapper(*a, **kw):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **kw)
            torch.cuda.synchronize()
            phases[name] += time.perf_counter() - t
            counts[name] += 1
            return out
        return wrapper

    def execute(sched):
        decode = all(n == 1 for n in sched.num_scheduled_tokens)
        graphs = runner.decode_graphs is not None and decode and len(sched.requests) <= runner.decode_graphs.max_batch_size
        key = "execute/decode-graph" if graphs else ("execute/decode-eager" if decode else "execute/mixed")
        return timed(key, orig_execute)(sched)

    core.scheduler.schedule = timed("schedule", orig_schedule)
    runner.execute = execute
    core.scheduler.update_after_step = timed("update", orig_update)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    print(f"total {total:.3f} s, {args.num_prompts * args.output_len / total:.0f} out tok/s")
    for k in sorted(phases):
        print(f"  {k:24s} {phases[k] * 1e3:9.1f} ms over {counts[k]:4d} calls = {phases[k] / counts[k] * 1e3:7.3f} ms/call")

    # A few pure-decode steps under the profiler: which kernels take the GPU time.
    core.scheduler.schedule, runner.execute, core.scheduler.update_after_step = orig_schedule, orig_execute, orig_update
    few = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, few, use_tqdm=False)
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "cuda_time_total"):
        try:
            print(averages.table(sort_by=key, row_limit=18))
            break
        except (AttributeError, KeyError, ValueError):
            continue


if __name__ == "__main__":
    main()
