"""W2 decode rate (128 prompt ids, 256 greedy tokens) of minivllm alone, bf16 vs quantised
weights on the same dummy config — the short form of ``latency.py --workload w2
--quantization`` for a device budget that cannot also run the HF peer.

    PYTHONPATH=. python benchmarks/w2_quant_quick.py benchmarks/models/qwen3-4b fp8 int8

The decode GEMVs run through the CUDA C++ op (csrc/gemv.cu) where it builds, per shape where it
measured faster; ``MINIVLLM_CUDA_GEMV=0`` keeps Triton. Each row says which implementation ran.
"""
import gc
import sys
import time

import torch

from minivllm import LLM, SamplingParams


def decode_tok_s(model: str, quantization: str | None) -> float:
    """Decode tok/s of one 128-token prompt, 256 greedy tokens (max_model_len 4096, as W2)."""
    llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
              quantization=quantization, skip_tokenizer_init=True, gpu_memory_utilization=0.6)
    def prompt():  # a fresh prompt per call: no prefix-cache hits in the timed runs
        return {"prompt_token_ids": torch.randint(0, 10000, (128,)).tolist()}

    for n in (1, 16):  # warm-up: the prefill-only and the decode paths
        llm.generate(prompt(), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                     use_tqdm=False)
    times = {}
    for n in (1, 256):
        p = prompt()
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - t
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return 255 / (times[256] - times[1])


def gemv_implementation() -> str:
    """Which batch-1 GEMV the loaded model runs (decided once, at load)."""
    from minivllm.layers import gemv_dispatch

    return gemv_dispatch.implementation()


if __name__ == "__main__":
    model, modes = sys.argv[1], [None] + sys.argv[2:]
    print(f"batch-1 GEMV implementation: {gemv_implementation()}", flush=True)
    base = None
    for mode in modes:
        rate = decode_tok_s(model, mode)
        base = base or rate
        print(f"| {model} | {mode or 'bf16'} | {rate:.0f} decode tok/s | {rate / base:.2f}x "
              f"| GEMV: {gemv_implementation()} |", flush=True)
