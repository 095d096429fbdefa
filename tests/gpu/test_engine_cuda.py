"""Engine on a GPU: Triton attention vs the torch reference, end to end, on Qwen3-0.6B dummy
weights (bf16). Skipped without CUDA (CI); run on the device with
``PYTHONPATH=. python -m pytest -q tests/gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minivllm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QWEN3_06B = str(Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "qwen3-0.6b")
NEW_TOKENS = 32
# bf16: a near tie between the two backends' top tokens may flip a greedy choice. Below this
# logprob gap (in the reference run) a divergence counts as a tie, not an error.
TIE_GAP = 0.15
LOGPROB_TOL = 0.08


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    shared = torch.randint(0, vocab, (96,), generator=g).tolist()
    lengths = [1, 15, 16, 17, 63, 200, 511, 1000]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    # Shared prefixes: later prompts hit the prefix cache filled by earlier ones.
    prompts += [shared + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 30, 70)]
    return prompts


def _run(backend: str, prompts, **kw):
    llm = LLM(QWEN3_06B, load_format="dummy", attention_backend=backend, seed=0, **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    # Again for the shared-prefix prompts: now their prefix blocks come from the cache.
    outs += llm.generate(prompts[-3:], params, use_tqdm=False)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] >= 3 * 96
    del llm
    torch.cuda.empty_cache()
    return outs, stats


def _compare(ref_outs, test_outs) -> tuple[int, int]:
    """Returns (identical tokens, total tokens); asserts closeness up to the first divergence."""
    same = total = 0
    for r, t in zip(ref_outs, test_outs):
        r_ids, t_ids = r.outputs[0].token_ids, t.outputs[0].token_ids
        for step, (a, b) in enumerate(zip(r_ids, t_ids)):
            total += 1
            r_lp, t_lp = r.outputs[0].logprobs[step], t.outputs[0].logprobs[step]
            common = set(r_lp) & set(t_lp)
            assert common, f"step {step}: no common top tokens"
            for tok in common:
                r_v, t_v = r_lp[tok].logprob, t_lp[tok].logprob
                assert abs(r_v - t_v) < LOGPROB_TOL, (step, tok, r_v, t_v)
            if a != b:
                # Only a near tie may flip the choice; after that the contexts differ.
                assert b in r_lp and r_lp[a].logprob - r_lp[b].logprob < TIE_GAP, (step, r_lp, t_lp)
                break
            same += 1
    return same, total


def test_triton_matches_torch_reference_end_to_end():
    prompts = _prompts(151936)
    ref, _ = _run("torch", prompts)
    tri, tri_stats = _run("triton", prompts)
    same, total = _compare(ref, tri)
    print(f"triton vs torch: {same}/{total} greedy tokens identical")
    assert same >= 0.8 * total


def test_triton_chunked_prefill_and_prefix_cache():
    prompts = _prompts(151936)
    ref, _ = _run("torch", prompts)
    tri, stats = _run("triton", prompts, max_num_batched_tokens=256)
    same, total = _compare(ref, tri)
    print(f"chunked (256-token budget): {same}/{total} identical; stats {stats}")
    assert same >= 0.8 * total


@pytest.mark.parametrize("label,reference,variant", [
    ("CUDA graphs vs eager", {"enforce_eager": True}, {"enforce_eager": False}),
    # Overlap on (the CUDA default) vs off: same kernels, tokens learnt one step later.
    ("overlap vs sync", {"async_scheduling": False}, {"async_scheduling": True}),
])
def test_engine_variant_matches_reference(label, reference, variant):
    prompts = _prompts(151936)
    ref, _ = _run("triton", prompts, **reference)
    out, _ = _run("triton", prompts, **variant)
    same, total = _compare(ref, out)
    print(f"{label}: {same}/{total} greedy tokens identical")
    assert same >= 0.8 * total


def test_no_triton_compilation_after_start_up():
    """A W1-shaped run (mixed prefill chunks and decodes, temperature sampling) right after
    start-up compiles no Triton kernel: the warm-up paid for all of them. Nor do the serving
    shapes after it: one greedy request (W2), the same prompt again (a prefix-cache hit: an
    extend step over cached blocks) and a prompt sharing only a prefix."""
    import random

    import triton

    llm = LLM(QWEN3_06B, load_format="dummy", seed=0, max_model_len=4096)
    compiled = []
    hook_owner = triton.knobs.runtime
    old = hook_owner.jit_post_compile_hook
    hook_owner.jit_post_compile_hook = lambda *a, **kw: compiled.append(kw.get("fn", a))
    try:
        rng = random.Random(1)
        prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(96)]
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(4, 64))
                  for _ in prompts]
        llm.generate(prompts, params, use_tqdm=False)
        greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=16)
        single = [rng.randint(0, 10000) for _ in range(128)]
        for prompt in (single, single, single[:64] + [rng.randint(0, 10000) for _ in range(40)]):
            llm.generate([prompt], greedy, use_tqdm=False)
    finally:
        hook_owner.jit_post_compile_hook = old
    print(f"Triton compilations after start-up: {len(compiled)} "
          f"{[getattr(c, '__name__', str(c))[:60] for c in compiled]}")
    assert compiled == []


def test_cuda_gemv_matches_triton_gemv_end_to_end(monkeypatch):
    """The batch-1 decode GEMVs through the CUDA C++ op (the default where it builds) against
    the Triton GEMV (``MINIVLLM_CUDA_GEMV=0``): one request at a time, so every decode step
    takes the GEMV path (fused RMSNorm inputs, the LM head, CUDA graphs on)."""
    from minivllm.csrc_ops import cuda_gemv

    prompts = _prompts(151936)[:6]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)

    def one_at_a_time(switch: str):
        monkeypatch.setenv(cuda_gemv.ENABLE_ENV, switch)
        cuda_gemv.enabled.cache_clear()  # the switch is read once per process
        try:
            llm = LLM(QWEN3_06B, load_format="dummy", seed=0, max_model_len=4096)
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        finally:
            cuda_gemv.enabled.cache_clear()
        del llm
        torch.cuda.empty_cache()
        return outs

    if not cuda_gemv.available():
        pytest.skip("the CUDA GEMV does not build or run here")
    triton_outs = one_at_a_time("0")
    cuda_outs = one_at_a_time("1")
    same, total = _compare(triton_outs, cuda_outs)
    print(f"CUDA GEMV vs Triton GEMV (batch 1): {same}/{total} greedy tokens identical")
    assert same >= 0.8 * total
