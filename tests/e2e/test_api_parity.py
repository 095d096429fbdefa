"""vLLM-shaped Python outputs: ``Logprob`` objects, ``CompletionOutput.finished()``,
``RequestOutput.prompt_logprobs``."""

from __future__ import annotations

import math

import pytest

from minivllm import LLM, SamplingParams
from minivllm.engine.input_processor import ProcessedPrompt, child_request_id
from minivllm.engine.messages import EngineCoreOutput
from minivllm.engine.output_processor import OutputProcessor
from minivllm.outputs import CompletionOutput, Logprob


class _LetterTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_greedy_logprobs_are_logprob_objects_with_rank_and_text(smol_llm):
    tok = smol_llm.get_tokenizer()
    out = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4, logprobs=3),
                            use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 4
    total = 0.0
    for tid, step in zip(c.token_ids, c.logprobs):
        assert all(isinstance(lp, Logprob) for lp in step.values())
        assert len(step) == 3 and step[tid].rank == 1  # greedy: the sampled token ranks first
        ordered = sorted(step.values(), key=lambda lp: -lp.logprob)
        assert [lp.rank for lp in ordered] == [1, 2, 3]
        assert all(lp.logprob <= 0 for lp in ordered)
        for t, lp in step.items():
            assert lp.decoded_token == tok.decode([t])
        total += step[tid].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert c.finished() is True and out.finished is True
    assert out.prompt_logprobs is None  # not asked for


def test_sampled_token_outside_the_top_n_keeps_its_vocabulary_rank(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", num_kv_blocks=8)
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=16, logprobs=1, ignore_eos=True)
    c = llm.generate([[3, 1, 4, 1, 5]], params, use_tqdm=False)[0].outputs[0]
    outside = 0
    for tid, step in zip(c.token_ids, c.logprobs):
        top = [lp for lp in step.values() if lp.rank == 1]
        assert len(top) == 1 and math.isfinite(top[0].logprob)
        assert all(lp.decoded_token is None for lp in step.values())  # no tokenizer
        if step[tid].rank != 1:
            outside += 1
            assert len(step) == 2 and step[tid].logprob <= top[0].logprob
    assert outside > 0  # a random tiny model's distribution is flat: samples leave the top 1


def test_output_processor_builds_logprobs_and_streams_finished():
    op = OutputProcessor(_LetterTokenizer())
    op.add_request("r", ProcessedPrompt(None, [1, 2]), SamplingParams(max_tokens=2, logprobs=2), 0.0, "cumulative")
    child = child_request_id("r", 0)
    # The core lists the top-2 most likely first, then the sampled token (rank 7) after them.
    first = EngineCoreOutput(child, [9], new_logprobs=[{3: -0.1, 4: -2.0, 9: -5.0}],
                             new_sampled_logprobs=[-5.0], new_sampled_ranks=[7])
    (partial,), _ = op.process([first])
    c = partial.outputs[0]
    assert c.finished() is False and partial.finished is False
    assert c.logprobs == [{3: Logprob(-0.1, 1, "d"), 4: Logprob(-2.0, 2, "e"), 9: Logprob(-5.0, 7, "j")}]
    second = EngineCoreOutput(child, [3], new_logprobs=[{3: -0.2, 5: -1.9}], new_sampled_logprobs=[-0.2],
                              new_sampled_ranks=[1], finish_reason="length")
    (final,), _ = op.process([second])
    c = final.outputs[0]
    assert c.finished() is True and final.finished is True
    assert c.logprobs[1] == {3: Logprob(-0.2, 1, "d"), 5: Logprob(-1.9, 2, "f")}
    assert c.cumulative_logprob == pytest.approx(-5.2)


def test_finished_is_a_method():
    assert CompletionOutput(0, "", [], finish_reason=None).finished() is False
    assert CompletionOutput(0, "x", [1], finish_reason="stop").finished() is True


ONE = SamplingParams(temperature=0, max_tokens=1)


def test_chat_template_arguments(smol_llm):
    user = [{"role": "user", "content": "Hi"}]
    own = smol_llm.chat(user, ONE, use_tqdm=False)[0].prompt
    assert own.endswith("<|im_start|>assistant\n")  # SmolLM2's template, generation prompt on
    plain = smol_llm.chat(user, ONE, use_tqdm=False, add_generation_prompt=False)[0].prompt
    assert own.startswith(plain) and not plain.endswith("assistant\n")
    template = "{% for m in messages %}{{ greeting }}{{ m['content'] }}|{% endfor %}"
    out = smol_llm.chat(user, ONE, use_tqdm=False, chat_template=template,
                        chat_template_kwargs={"greeting": "Yo "})[0]
    assert out.prompt == "Yo Hi|"
    assert out.prompt_token_ids == smol_llm.get_tokenizer()("Yo Hi|", add_special_tokens=False)["input_ids"]
    convo = user + [{"role": "assistant", "content": "The capital of France is"}]
    cont = smol_llm.chat(convo, ONE, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert cont.prompt.endswith("The capital of France is")  # the reply is left open


@pytest.mark.parametrize("kwargs, message", [
    (dict(continue_final_message=True), "cannot both be True"),
    (dict(continue_final_message=True, add_generation_prompt=False), "last message to be from the assistant"),
    (dict(chat_template_kwargs={"tokenize": True}), "may not set tokenize"),
    (dict(chat_template="{{ raise_exception('no way') }}"), "chat template failed: no way"),
])
def test_bad_chat_template_arguments_are_value_errors(smol_llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        smol_llm.chat([{"role": "user", "content": "Hi"}], ONE, use_tqdm=False, **kwargs)
