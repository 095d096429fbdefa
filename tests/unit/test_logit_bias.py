"""``logit_bias`` and ``allowed_token_ids`` in the sampler and the per-step metadata: sparse on
the device, applied after the raw logprobs, isolated per row, and no work when no row uses them."""

from __future__ import annotations

import msgpack
import pytest
import torch

from minivllm.engine.serialization import params_from_wire, params_to_wire
from minivllm.runner.sampling_rows import SamplingRows
from minivllm.sampling_params import SamplingParams
from tests.unit.test_sampler import CPU, SamplingState, req, seeded_sampler

VOCAB = 64


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_bias_is_sparse_and_touches_only_its_row():
    logits = _logits(3)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={5: 100, 9: -2.5}),
              SamplingParams(temperature=0)]
    md = SamplingState(CPU, VOCAB).build([req(f"r{i}", p) for i, p in enumerate(params)])
    assert md.banned_mask is None  # a bias bans nothing
    b = md.logit_bias
    assert b.rows.tolist() == [1, 1] and b.token_ids.tolist() == [5, 9]
    assert b.values.tolist() == [100.0, -2.5]
    out = seeded_sampler()(logits, md)
    expected = logits.argmax(-1)
    expected[1] = 5
    assert out.sampled_token_ids.tolist() == expected.tolist()


def test_bias_shifts_the_distribution_but_not_the_logprobs():
    logits = _logits(2, seed=1)
    forced = logits[0].argmin().item()
    md = SamplingState(CPU, VOCAB).build([
        req("a", SamplingParams(temperature=1.0, logit_bias={forced: 100}, logprobs=3), seed=1),
        req("b", SamplingParams(temperature=0, logit_bias={forced: -100}, logprobs=3))])
    before = logits.clone()
    out = seeded_sampler()(logits, md)
    assert torch.equal(logits, before)  # the caller's logits are not modified in place
    assert out.sampled_token_ids.tolist() == [forced, logits[1].argmax().item()]
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.sampled_logprobs, raw.gather(-1, out.sampled_token_ids[:, None])[:, 0])
    assert out.topk_token_ids.tolist() == raw.topk(3).indices.tolist()
    assert out.sampled_ranks[0].item() == VOCAB  # the least likely token by the raw distribution


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 1.5},
                                {"temperature": 1.0, "top_k": 1}, {"temperature": 0.8, "top_p": 0.5, "min_p": 0.1}])
def test_allowed_ids_are_the_only_ones_ever_drawn(kw):
    allowed = [3, 17, 40]
    n = 300
    logits = _logits(n, seed=2)
    logits[:, 0] += 30  # a token the model wants badly, outside the set
    reqs = [req(f"r{i}", SamplingParams(allowed_token_ids=allowed, **kw), seed=i if i % 2 else None)
            for i in range(n)]
    md = SamplingState(CPU, VOCAB).build(reqs)
    drawn = seeded_sampler()(logits, md).sampled_token_ids
    assert set(drawn.tolist()) <= set(allowed)
    if kw.get("temperature") == 0 or kw.get("top_k") == 1:  # the best of the allowed ones
        assert drawn.tolist() == logits[:, allowed].argmax(-1).apply_(allowed.__getitem__).tolist()
    elif kw.get("temperature") == 1.5:
        assert len(set(drawn.tolist())) == 3  # it still samples among them


def test_allowed_ids_with_min_tokens_ban_and_bias_together():
    eos, stop = 7, 8
    logits = torch.zeros(1, VOCAB)
    logits[0, eos], logits[0, stop], logits[0, 20] = 10.0, 9.0, 1.0
    state = SamplingState(CPU, VOCAB)
    params = SamplingParams(temperature=0, allowed_token_ids=[eos, stop, 20, 21], min_tokens=2,
                            stop_token_ids=[stop], logit_bias={21: 2.0})
    md = state.build([req("r", params, eos=(eos,))])
    # EOS and the stop id are allowed but banned until min_tokens: 21 (0 + 2 bias) beats 20 (1).
    assert md.banned_mask[0].logical_not().nonzero().flatten().tolist() == [20, 21]
    assert seeded_sampler()(logits, md).sampled_token_ids.item() == 21
    md = state.build([req("r", params, output=[21, 21], eos=(eos,))])  # min_tokens reached
    assert seeded_sampler()(logits, md).sampled_token_ids.item() == eos


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_an_allowed_set_that_min_tokens_bans_whole_still_samples_from_it(temperature):
    """``check_token_ids`` refuses such a request; one that gets past it anyway must not see a
    row of -inf (NaN weights, an arbitrary token): its allowed set wins over min_tokens."""
    eos = 7
    params = SamplingParams(temperature=temperature, allowed_token_ids=[eos], min_tokens=3)
    with pytest.raises(ValueError, match="min_tokens"):
        params.check_token_ids(VOCAB, {eos})
    md = SamplingState(CPU, VOCAB).build([req("r", params, eos=(eos,), seed=3),
                                          req("s", SamplingParams(temperature=temperature), seed=4)])
    assert not md.banned_mask[0].all()
    out = seeded_sampler()(_logits(2, seed=3), md)
    assert out.sampled_token_ids[0].item() == eos


def test_no_rules_no_work_and_rows_forget_them(monkeypatch):
    rows = SamplingRows(8, VOCAB, CPU)
    state = SamplingState(CPU, VOCAB)
    state.rows = rows
    calls = []
    real = SamplingRows._step_rules
    monkeypatch.setattr(SamplingRows, "_step_rules", lambda self, r: calls.append(1) or real(self, r))
    plain = [req(f"p{i}", SamplingParams(temperature=0.7, top_k=5)) for i in range(3)]
    md = state.build(plain)
    assert md.logit_bias is None and md.banned_mask is None and not calls  # the fast path
    biased = req("b", SamplingParams(logit_bias={1: 1.0}, allowed_token_ids=[1, 2]))
    md = state.build(plain + [biased])
    assert md.logit_bias.rows.tolist() == [3] and md.banned_mask[:3].sum() == 0
    again = state.build(plain + [biased])
    assert again.banned_mask is md.banned_mask and again.logit_bias is md.logit_bias  # cached
    md = state.build([biased] + plain)  # another layout: rebuilt
    assert md.logit_bias.rows.tolist() == [0] and md.banned_mask[0].sum() == VOCAB - 2
    # The row goes away (or is reused by a plain request): no trace, back to the fast path.
    rows.remove(state._row_of["b"][0])
    assert rows._num_rule_rows == 0 and rows._step_rules_cache is None
    calls.clear()
    md = state.build(plain)
    assert md.logit_bias is None and md.banned_mask is None and not calls
    reused = req("b", SamplingParams())  # same id and row, new request object: re-added
    md = state.build(plain + [reused])
    assert md.logit_bias is None and md.banned_mask is None and rows._num_rule_rows == 0


def test_params_validate_and_survive_the_wire():
    p = SamplingParams(logit_bias={5: 10, 2**40: -100.0}, allowed_token_ids=(3, 3, 4))
    assert p.logit_bias == {5: 10.0, 2**40: -100.0} and isinstance(p.logit_bias[5], float)
    assert p.allowed_token_ids == [3, 3, 4]
    wire = msgpack.unpackb(msgpack.packb(params_to_wire(p), use_bin_type=True), raw=False,
                           strict_map_key=False)
    assert params_from_wire(wire) == p
    import pickle  # what tensor-parallel workers receive
    assert pickle.loads(pickle.dumps(p)) == p
    with pytest.raises(ValueError, match="logit_bias: token id 64 is out of vocabulary"):
        SamplingParams(logit_bias={64: 1}).check_token_ids(VOCAB)
    with pytest.raises(ValueError, match="allowed_token_ids: token id 99"):
        SamplingParams(allowed_token_ids=[1, 99]).check_token_ids(VOCAB)
    SamplingParams(logit_bias={63: 1}, allowed_token_ids=[0, 63]).check_token_ids(VOCAB)
    # Only stop ids allowed, min_tokens: refused; with another token or ignore_eos: fine.
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[5], stop_token_ids=[5], min_tokens=1).check_token_ids(VOCAB)
    SamplingParams(allowed_token_ids=[5, 6], stop_token_ids=[5], min_tokens=1).check_token_ids(VOCAB)
    SamplingParams(allowed_token_ids=[2], ignore_eos=True, min_tokens=1).check_token_ids(VOCAB, {2})


def test_engine_core_checks_the_ids_again():
    """A request that skipped the frontend's checks fails alone in the core, naming the field."""
    from minivllm.engine.core_proc import request_from_wire

    wire = {"request_id": "r", "prompt_token_ids": [1, 2], "arrival_time": 0.0, "eos_token_ids": [2],
            "seed": None, "params": params_to_wire(SamplingParams(logit_bias={3: 1.0}))}
    assert request_from_wire(wire, VOCAB).params.logit_bias == {3: 1.0}
    wire["params"]["logit_bias"] = {VOCAB: 1.0}
    with pytest.raises(ValueError, match="logit_bias: token id 64"):
        request_from_wire(wire, VOCAB)
    wire["params"].update(logit_bias=None, allowed_token_ids=[2], min_tokens=1)  # only EOS, banned
    with pytest.raises(ValueError, match="nothing could be sampled"):
        request_from_wire(wire, VOCAB)
