"""Where the time goes: GPU kernel time vs wall time of a generate, and the top kernels.

    PYTHONPATH=. python benchmarks/profile_step.py --num-prompts 1 --input-len 128 --output-len 64
    PYTHONPATH=. python benchmarks/profile_step.py --num-prompts 256 --input-len 256 --output-len 64

Random weights (load_format="dummy") from a config directory; CUDA only. Kernel time close to
wall time means the GPU is the limit (make kernels faster); far below it means the host is.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--quantization", default=None, help="fp8 / int8 weights")
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from minivllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16",
              async_scheduling=not args.no_async_scheduling, max_model_len=4096,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 10000, (args.num_prompts, args.input_len), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([p[::-1] for p in prompts], params, use_tqdm=False)  # warm-up, no prefix hits

    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate([p[1:] + p[:1] for p in prompts], params, use_tqdm=False)
        torch.cuda.synchronize()
        prof_wall = time.perf_counter() - t
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        dt = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        kernels.setdefault(evt.name, []).append(dt)
    total_us = sum(sum(v) for v in kernels.values())
    steps = args.output_len
    print(f"wall {wall * 1e3:.1f} ms ({args.num_prompts * args.output_len / wall:.0f} out tok/s); "
          f"profiled wall {prof_wall * 1e3:.1f} ms; kernel time {total_us / 1e3:.1f} ms "
          f"({total_us / 1e3 / prof_wall / 1e3:.0%} busy); per step: wall {wall / steps * 1e3:.3f} ms, "
          f"kernels {total_us / steps / 1e3:.3f} ms")
    print(f"{'kernel':80s} {'total ms':>9s} {'calls':>7s} {'us/call':>8s}")
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
        print(f"{name[:80]:80s} {sum(times) / 1e3:9.2f} {len(times):7d} {sum(times) / len(times):8.2f}")


if __name__ == "__main__":
    main()
