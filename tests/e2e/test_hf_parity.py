"""Greedy outputs must equal HF transformers token for token (float32, CPU)."""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from tests.conftest import TINY_KINDS, hf_greedy, random_prompts

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your steps.",
    "Give me a short recipe for pancakes.",
    "Who wrote 'Pride and Prejudice', and when?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]


def test_embedded_smollm_matches_hf_in_one_batch(smol_llm, hf_smol):
    """≥ 8 varied chat prompts, one batch, ≥ 32 new tokens each, ids identical to HF generate."""
    n_new = 32
    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    outs = smol_llm.chat([[{"role": "user", "content": p}] for p in CHAT_PROMPTS], params, use_tqdm=False)
    assert len(outs) == len(CHAT_PROMPTS)
    tok = smol_llm.get_tokenizer()
    for prompt, out in zip(CHAT_PROMPTS, outs):
        expected_prompt = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True)
        if hasattr(expected_prompt, "keys"):  # transformers 5 returns a BatchEncoding
            expected_prompt = expected_prompt["input_ids"]
        assert out.prompt_token_ids == list(expected_prompt)
        ref = hf_greedy(hf_smol, out.prompt_token_ids, n_new)
        assert out.outputs[0].token_ids == ref, f"diverged on {prompt!r}"
        assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_random_models_match_hf(kind, tiny_model_dirs, hf_tiny_models):
    """GQA / MHA, qkv bias, q/k norm, tied and untied heads, llama3 rope scaling; prompt
    lengths around block boundaries (block_size 16)."""
    lengths = [1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 100]
    prompts = random_prompts(lengths, seed=7)
    llm = LLM(tiny_model_dirs[kind], device="cpu", block_size=16)
    n_new = 24
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_tiny_models[kind], p, n_new), f"length {len(p)}"
        assert out.outputs[0].finish_reason == "length"
