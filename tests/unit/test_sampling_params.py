"""SamplingParams: every bad value is a ValueError naming the field; good values normalise."""

from __future__ import annotations

import pytest

from minivllm.sampling_params import SamplingParams, _short_repr

INVALID = [
    # (kwargs, text the message must contain)
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1.0"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(min_p=1.1), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(n=0), "n "),
    (dict(n=True), "n "),
    (dict(n=1.0), "n "),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=2.5), "repetition_penalty"),
    (dict(presence_penalty=2.1), "presence_penalty"),
    (dict(presence_penalty=-2.1), "presence_penalty"),
    (dict(frequency_penalty=2.1), "frequency_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(stop=5), "stop"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop=[None]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=["fine", ""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=["2"]), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(seed=1.5), "seed"),
    # Ranges: every int ends up in an int64 tensor or a torch.Generator seed inside a step,
    # every float in a float32 tensor; an overflow there would fail a whole batch.
    (dict(top_k=2**63), "top_k"),  # the request that used to kill the engine
    (dict(top_k=10**5000), "top_k"),  # beyond Python's int-to-str limit: the message still works
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=True), "seed"),
    (dict(stop_token_ids=[2**63]), "stop_token_ids"),
    (dict(stop_token_ids=[1, 10**5000]), "stop_token_ids"),
    (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
    (dict(max_tokens=2**63), "max_tokens"),
    (dict(min_tokens=2**63, max_tokens=None), "min_tokens"),
    (dict(logprobs=2**63), "logprobs"),
    (dict(n=129), "n "),
    (dict(n=20000), "n "),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e39), "temperature"),  # finite in Python, inf in float32
    (dict(temperature=10**400), "temperature"),  # an int too large for a float
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=1e-300), "top_p"),  # positive in Python, 0 in float32
    (dict(min_p=float("nan")), "min_p"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(presence_penalty=float("-inf")), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(ignore_eos="false"), "ignore_eos"),
    (dict(skip_special_tokens=None), "skip_special_tokens"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    (dict(stop=["x"] * 65), "stop"),
    (dict(stop="x" * 1025), "stop"),
    (dict(stop=["ok", "\ud800"]), "stop"),  # a lone surrogate cannot cross to the core
    (dict(logit_bias={5: 100.5}), "logit_bias"),  # OpenAI's range is [-100, 100]
    (dict(logit_bias={5: -101}), "logit_bias"),
    (dict(logit_bias={5: float("nan")}), "logit_bias"),
    (dict(logit_bias={5: float("inf")}), "logit_bias"),
    (dict(logit_bias={5: True}), "logit_bias"),
    (dict(logit_bias={5: "1"}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),  # keys are ints here (the server converts)
    (dict(logit_bias={True: 1.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={2**63: 1.0}), "logit_bias"),
    (dict(logit_bias={10**5000: 1.0}), "logit_bias"),
    (dict(logit_bias=[(5, 1.0)]), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -1]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, True]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1.0]), "allowed_token_ids"),
    (dict(allowed_token_ids=[2**63]), "allowed_token_ids"),
    (dict(allowed_token_ids=5), "allowed_token_ids"),
    (dict(allowed_token_ids="12"), "allowed_token_ids"),
]


@pytest.mark.parametrize("kwargs,field", INVALID, ids=[_short_repr(k, 60) for k, _ in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert field in str(info.value)


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs) == (16, 0, None, None)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.stop_strings == [] and p.stop_token_ids == []
    assert not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy


def test_stop_normalisation():
    assert SamplingParams(stop="x").stop_strings == ["x"]
    assert SamplingParams(stop="\n\nUser:").stop_strings == ["\n\nUser:"]  # one string, not chars
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]
    assert SamplingParams(stop=("a",)).stop_strings == ["a"]
    assert SamplingParams(stop=[]).stop_strings == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_edges_that_are_valid():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=-1).top_k == 0  # -1 and 0 both mean "off"
    assert SamplingParams(top_k=1).top_k == 1
    SamplingParams(top_p=1.0)
    SamplingParams(top_p=1e-6)
    SamplingParams(min_p=0.0)
    SamplingParams(min_p=1.0)
    SamplingParams(max_tokens=1)
    SamplingParams(max_tokens=None)
    SamplingParams(min_tokens=4, max_tokens=4)
    SamplingParams(min_tokens=100, max_tokens=None)
    SamplingParams(n=3, seed=0)
    SamplingParams(logprobs=0)
    SamplingParams(logprobs=20)
    SamplingParams(repetition_penalty=2.0, presence_penalty=-2.0, frequency_penalty=2.0)
    SamplingParams(repetition_penalty=0.5, presence_penalty=2, frequency_penalty=-2)
    SamplingParams(stop_token_ids=[0])
    # The edges of each range are themselves valid.
    SamplingParams(top_k=2**63 - 1, seed=2**64 - 1, stop_token_ids=[2**63 - 1], n=128)
    SamplingParams(seed=-(2**63), max_tokens=2**63 - 1, min_tokens=2**63 - 1)
    SamplingParams(stop=["x"] * 64, stop_token_ids=list(range(1024)))
    SamplingParams(temperature=3e38, top_p=1e-30)
    SamplingParams(logit_bias={}, allowed_token_ids=[0])
    SamplingParams(logit_bias={0: -100, 2**63 - 1: 100.0}, allowed_token_ids=[2**63 - 1, 0, 0])


def test_tiny_temperature_is_raised_to_a_safe_minimum():
    # logits / 1e-40 overflows float32 (NaN probabilities); 0.01 samples like greedy anyway.
    assert SamplingParams(temperature=1e-40).temperature == 0.01
    assert SamplingParams(temperature=0.005).temperature == 0.01
    assert SamplingParams(temperature=0.02).temperature == 0.02
    assert SamplingParams(temperature=0).temperature == 0
