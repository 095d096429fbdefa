"""Bad input fails with a ValueError and a message; the same LLM keeps working afterwards."""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from tests.conftest import TINY_VOCAB, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["qwen3"], device="cpu", max_model_len=64)


@pytest.fixture(scope="module")
def good_prompt():
    return random_prompts([10], seed=21)[0]


@pytest.fixture(scope="module")
def expected(llm, good_prompt):
    return llm.generate([good_prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


BAD_PROMPTS = {
    "empty token list": ([[]], "empty"),
    "empty dict tokens": ([{"prompt_token_ids": []}], "empty"),
    "negative id": ([[1, -3, 4]], "out of vocabulary"),
    "out-of-vocab id": ([[1, TINY_VOCAB, 4]], "out of vocabulary"),
    "non-int id": ([[1, 2.5]], "integers"),
    "too long": ([list(range(64))], "max_model_len"),
    "empty list": ([], "no prompts"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt_raises_and_engine_survives(case, llm, good_prompt, expected):
    prompts, message = BAD_PROMPTS[case]
    # A bad prompt next to good ones: nothing runs, nothing is left queued.
    mixed = prompts + [good_prompt] if prompts else prompts
    with pytest.raises(ValueError, match=message):
        llm.generate(mixed, GREEDY, use_tqdm=False)
    assert llm.stats()["num_running"] == 0 and llm.stats()["num_waiting"] == 0
    assert llm.generate([good_prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", GREEDY, use_tqdm=False)


def test_empty_text_prompt(smol_llm):
    with pytest.raises(ValueError, match="empty"):
        smol_llm.generate("", GREEDY, use_tqdm=False)
    assert smol_llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_mismatched_params_list(llm, good_prompt, expected):
    with pytest.raises(ValueError, match="same length"):
        llm.generate([good_prompt, good_prompt], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([good_prompt], [{"temperature": 0}], use_tqdm=False)
    assert llm.generate([good_prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"n": 0}, "n"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": [""]}, "stop"), ({"logprobs": -1}, "logprobs"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"block_size": 10}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"load_format": "pickle"}, "load_format"), ({"attention_backend": "flash"}, "attention_backend"),
    ({"dtype": "int8"}, "dtype"), ({"max_model_len": 100000}, "max_model_len"),
    ({"tensor_parallel_size": 3}, "tensor_parallel_size"),  # 4 heads do not split over 3 ranks
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"attention_backend": "triton"}, "head_dim"),  # tiny llama has head_dim 16: no kernel for it
])
def test_invalid_engine_args(kwargs, message, tiny_model_dirs):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model_dirs["llama"], device="cpu", **kwargs)


def test_bad_model_path():
    with pytest.raises(ValueError):
        LLM("/nonexistent/model/dir", device="cpu")
