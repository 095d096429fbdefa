"""The whole engine on the Triton backend (Triton interpreter on CPU) equals the torch reference:
tiny GQA model, float32, chunked prefill and prefix-cache hits included."""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from tests.conftest import random_prompts

pytest.importorskip("triton")


def _generate(model_dir: str, backend: str, prompts, **kw):
    llm = LLM(model_dir, device="cpu", dtype="float32", attention_backend=backend, **kw)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts[-2:], params, use_tqdm=False)  # prefix-cache hits
    ids = [o.outputs[0].token_ids for o in first + again]
    return ids, llm.stats(), type(llm.engine.executor.runner.backend).__name__


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU runs tests/gpu")
def test_triton_backend_matches_torch_through_the_engine(tiny_model_dirs):
    shared = random_prompts([40], seed=31)[0]
    prompts = random_prompts([1, 17, 33], seed=32) + [shared + [5], shared + [9, 10, 11]]
    # A 24-token budget forces chunked prefill and decode/prefill mixing.
    ref, _, ref_backend = _generate(tiny_model_dirs["qwen3_hd64"], "torch", prompts, max_num_batched_tokens=24)
    tri, stats, tri_backend = _generate(tiny_model_dirs["qwen3_hd64"], "triton", prompts, max_num_batched_tokens=24)
    assert (ref_backend, tri_backend) == ("TorchReferenceBackend", "TritonAttentionBackend")
    assert tri == ref
    assert stats["prefix_cache_hits"] >= 2 * 32
