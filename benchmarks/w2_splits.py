"""W2 decode rate against the split-KV count of the decode kernel (an experiment, CUDA only).

Under CUDA graphs the split count comes from the static ``max_model_len`` cap (16 splits at
4096 for one sequence of Qwen3-0.6B), while W2's context is at most 384 tokens. This pins the
count to each value given and reports the decode rate, so the heuristic can be judged.

    PYTHONPATH=. python benchmarks/w2_splits.py benchmarks/models/qwen3-0.6b default 1 2 4 8
"""
import sys

import minivllm.kernels.paged_decode as paged_decode
from benchmarks.w2_quant_quick import decode_tok_s

if __name__ == "__main__":
    model, counts = sys.argv[1], sys.argv[2:] or ["default"]
    heuristic = paged_decode.choose_num_splits
    for count in counts:
        if count == "default":
            paged_decode.choose_num_splits = heuristic
        else:
            paged_decode.choose_num_splits = lambda *a, n=int(count), **kw: n
        rate = decode_tok_s(model, None)
        print(f"| {model} | splits {count} | {rate:.0f} decode tok/s |", flush=True)
