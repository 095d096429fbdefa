"""Sampler on CPU: greedy, filters, penalties, banned tokens, per-request seeds, logprobs.

Metadata is built the way the runner builds it (``SamplingRows``, the persistent batch's
per-row settings, filled from ``Request`` objects by ``SamplingState`` below) wherever a test
is about what a request asks for; hand-made ``SamplingMetadata`` is used for
the filter arithmetic. Every random draw comes from a fixed seed, so results are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minivllm.engine.request import Request
from minivllm.layers.sampler import Sampler, SamplingMetadata, apply_penalties, filter_logits
from minivllm.runner.sampling_rows import SamplingRows
from minivllm.sampling_params import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which costs
    seconds on a busy machine. Restored afterwards for the other test modules."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


class SamplingState:
    """Requests → rows of a ``SamplingRows``, as the runner's persistent batch does it: a request
    keeps its row (and seeded generator) for as long as the same object is passed."""

    def __init__(self, device: torch.device, vocab_size: int, max_rows: int = 4096) -> None:
        self.rows = SamplingRows(max_rows, vocab_size, device)
        self.device = device
        self._row_of: dict[str, tuple[int, Request]] = {}

    def build(self, reqs: list[Request]) -> SamplingMetadata:
        rows = []
        for r in reqs:
            known = self._row_of.get(r.request_id)
            if known is None or known[1] is not r:
                row = known[0] if known is not None else len(self._row_of)
                self.rows.add(row, r.params, r.seed, tuple(r.eos_token_ids), r.prompt_token_ids,
                              r.output_token_ids)
                self._row_of[r.request_id] = (row, r)
            row = self._row_of[r.request_id][0]
            self.rows.num_output[row] = r.num_output_tokens
            rows.append(row)
        self.rows.apply(*self._flush())
        host = torch.tensor(rows, dtype=torch.int64)
        return self.rows.metadata(host.numpy(), host.to(self.device))

    def _flush(self):
        from minivllm.runner.staging import StagingBuffer

        staging = StagingBuffer(self.device)
        staging.begin()
        handles = self.rows.stage(staging)
        return handles, staging.upload()


def req(rid: str, params: SamplingParams, *, prompt: list[int] = (1,), output: list[int] = (),
        seed: int | None = None, eos: tuple[int, ...] = ()) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(prompt), params=params, arrival_time=0.0,
                   eos_token_ids=frozenset(eos), seed=seed, output_token_ids=list(output))


def metadata(batch: int, *, temperature: float | list[float] = 1.0, top_k: int | list[int] = 0,
             top_p: float | list[float] = 1.0, min_p: float | list[float] = 0.0,
             max_num_logprobs: int = -1) -> SamplingMetadata:
    def col(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * batch, dtype=dtype)

    t, k, p, m = (col(temperature, torch.float32), col(top_k, torch.int64),
                  col(top_p, torch.float32), col(min_p, torch.float32))
    return SamplingMetadata(temperature=t, top_k=k, top_p=p, min_p=m, all_greedy=bool((t == 0).all()),
                            any_top_k=bool((k > 0).any()), any_top_p=bool((p < 1).any()),
                            any_min_p=bool((m > 0).any()), generators=[None] * batch,
                            max_num_logprobs=max_num_logprobs)


def seeded_sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Token ids left unmasked, per row."""
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


# ---- greedy and top-k -----------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    reqs = [req(f"r{i}", SamplingParams(temperature=0), seed=i if i % 2 else None) for i in range(8)]
    out = seeded_sampler()(logits, SamplingState(CPU, 100).build(reqs))
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()


def test_greedy_rows_stay_greedy_in_a_sampling_batch():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=1.5, top_k=20)
              for i in range(6)]
    md = SamplingState(CPU, 100).build([req(f"r{i}", p) for i, p in enumerate(params)])
    assert not md.all_greedy
    sampler = seeded_sampler()
    for _ in range(5):
        got = sampler(logits, md).sampled_token_ids
        assert got[0::2].tolist() == logits[0::2].argmax(-1).tolist()


def test_top_k_1_equals_greedy_at_any_temperature():
    logits = torch.randn(64, 200, generator=torch.Generator().manual_seed(2)) * 0.5  # flat: easy to miss
    reqs = [req(f"r{i}", SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(64)]
    out = seeded_sampler()(logits, SamplingState(CPU, 200).build(reqs))
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    # A tiny top_p does the same: only the most likely token reaches it.
    reqs = [req(f"p{i}", SamplingParams(temperature=2.0, top_p=1e-6)) for i in range(64)]
    out = seeded_sampler()(logits, SamplingState(CPU, 200).build(reqs))
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()


# ---- filters on hand-made distributions -----------------------------------------------------

PROBS = torch.tensor([0.2, 0.4, 0.1, 0.3])  # by rank: token 1, 3, 0, 2


def test_top_k_keeps_k_most_likely():
    logits = PROBS.log().repeat(4, 1)
    out = filter_logits(logits, metadata(4, top_k=[1, 2, 3, 0]))
    assert kept(out) == [[1], [1, 3], [0, 1, 3], [0, 1, 2, 3]]
    # Kept entries are unchanged.
    assert torch.equal(out[3], logits[3])


def test_top_p_keeps_smallest_set_reaching_p():
    logits = PROBS.log().repeat(5, 1)
    out = filter_logits(logits, metadata(5, top_p=[0.35, 0.65, 0.75, 0.95, 1.0]))
    # 0.4 ≥ 0.35; 0.4+0.3 ≥ 0.65; then + 0.2 ≥ 0.75; then all; 1.0 keeps all.
    assert kept(out) == [[1], [1, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert torch.equal(out[1, [1, 3]], logits[1, [1, 3]])


def test_top_p_one_is_a_no_op_when_other_rows_use_top_p():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 0] += 20  # one dominant token, as after a confident model step
    out = filter_logits(logits, metadata(2, top_p=[1.0, 0.9]))
    assert kept(out)[0] == list(range(1000))


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = PROBS.log()[None]
    # Within the top 2 (0.4, 0.3) token 1 holds 0.57 ≥ 0.5, so it alone is kept;
    # without top-k it would need 0.4 + 0.3.
    assert kept(filter_logits(logits, metadata(1, top_k=2, top_p=0.5))) == [[1]]
    assert kept(filter_logits(logits, metadata(1, top_p=0.5))) == [[1, 3]]


def test_min_p_threshold_is_relative_to_top_probability():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().repeat(4, 1)
    out = filter_logits(logits, metadata(4, min_p=[0.0, 0.2, 0.5, 1.0]))
    # thresholds: 0, 0.1, 0.25, 0.5 × max prob 0.5
    assert kept(out) == [[0, 1, 2, 3], [0, 1, 3], [1, 3], [1]]


# ---- penalties and banned tokens --------------------------------------------------------------

def test_penalty_arithmetic():
    vocab = 7
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0, 0.0]]).repeat(2, 1)
    penalised = SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    reqs = [req("p", penalised, prompt=[0, 1], output=[2, 2, 3]),
            req("plain", SamplingParams(), prompt=[0, 1], output=[2, 2, 3])]
    md = SamplingState(CPU, vocab).build(reqs)
    out = apply_penalties(logits, md)
    # Repetition (prompt + output tokens): positive / 2, negative × 2. Then, for output tokens
    # only: minus 0.5 per occurrence and 0.25 once.
    expected = [2.0 / 2, -2.0 * 2, 1.0 / 2 - 0.5 * 2 - 0.25, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0, 0.0]
    assert out[0].tolist() == pytest.approx(expected)
    assert torch.equal(out[1], logits[1])  # a row without penalties is untouched


def test_negative_presence_and_frequency_encourage_repeats():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=-0.5, frequency_penalty=-0.1)
    md = SamplingState(CPU, 3).build([req("r", params, prompt=[0], output=[1])])
    assert seeded_sampler()(logits, md).sampled_token_ids.tolist() == [1]


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0]])
    sampler = seeded_sampler()

    def pick(params: SamplingParams, prompt: list[int], output: list[int]) -> int:
        md = SamplingState(CPU, 4).build([req("r", params, prompt=prompt, output=output)])
        return sampler(logits, md).sampled_token_ids.item()

    assert pick(SamplingParams(temperature=0), [0], [0]) == 0
    # 5 / 1.5 = 3.33 < 4: token 0 (seen in the prompt) loses to token 1.
    assert pick(SamplingParams(temperature=0, repetition_penalty=1.5), [0], []) == 1
    # Frequency counts occurrences in the output (not the prompt): 5 - 2×0.6 = 3.8 < 4.
    assert pick(SamplingParams(temperature=0, frequency_penalty=0.6), [0], []) == 0
    assert pick(SamplingParams(temperature=0, frequency_penalty=0.6), [2], [0, 0]) == 1
    assert pick(SamplingParams(temperature=0, presence_penalty=1.5), [2], [0]) == 1


def test_banned_tokens_before_min_tokens():
    vocab = 8
    eos, stop_id = 7, 6
    logits = torch.zeros(1, vocab)
    logits[0, eos], logits[0, stop_id] = 10.0, 9.0  # the model badly wants to stop
    state = SamplingState(CPU, vocab)

    def build(params: SamplingParams, n_out: int, rows: int = 1) -> SamplingMetadata:
        return state.build([req(f"r{i}", params, output=[1] * n_out, eos=(eos,)) for i in range(rows)])

    greedy = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop_id])
    md = build(greedy, 1)
    assert md.banned_mask[0].nonzero().flatten().tolist() == [stop_id, eos]
    assert seeded_sampler()(logits, md).sampled_token_ids.item() not in (eos, stop_id)
    # ignore_eos: EOS is an ordinary token, but stop ids still wait for min_tokens.
    md = build(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop_id], ignore_eos=True), 1)
    assert seeded_sampler()(logits, md).sampled_token_ids.item() == eos
    # Once min_tokens are out, nothing is banned.
    md = build(greedy, 3)
    assert md.banned_mask is None
    assert seeded_sampler()(logits, md).sampled_token_ids.item() == eos
    # Random sampling never draws a banned token either, though they hold ~all the mass.
    md = build(SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[stop_id]), 0, rows=500)
    drawn = seeded_sampler()(logits.repeat(500, 1), md).sampled_token_ids
    assert not torch.isin(drawn, torch.tensor([eos, stop_id])).any()
    assert len(set(drawn.tolist())) > 3  # and it still samples among the rest


# ---- seeds ------------------------------------------------------------------------------------

TARGET_PARAMS = [
    SamplingParams(temperature=1.0, seed=1234),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=1234),
]
OTHER_PARAMS = [
    (SamplingParams(temperature=1.0), None),
    (SamplingParams(temperature=0.7, top_p=0.8, seed=99), 99),
    (SamplingParams(temperature=0), None),
    (SamplingParams(temperature=1.2, top_k=5, repetition_penalty=1.3, frequency_penalty=0.5), None),
    (SamplingParams(temperature=0.5, min_p=0.1, presence_penalty=0.4, seed=7), 7),
    (SamplingParams(temperature=1.0, logprobs=3), None),
]


def run_seeded(target: SamplingParams, seed: int, steps: int, others_per_step: list[int],
               position_per_step: list[int], default_seed: int) -> list[int]:
    """Sample ``steps`` tokens for one seeded request among varying other rows."""
    vocab = 500
    logit_gen = torch.Generator().manual_seed(42)  # the target's "model": same logits each run
    other_gen = torch.Generator().manual_seed(default_seed + 1000)
    state = SamplingState(CPU, vocab)
    sampler = seeded_sampler(default_seed)
    me = req("target", target, prompt=[3, 4, 5], seed=seed)
    others = [req(f"o{i}", p, prompt=[1, 2], seed=s) for i, (p, s) in enumerate(OTHER_PARAMS)]
    for step in range(steps):
        target_logits = torch.randn(vocab, generator=logit_gen) * 3
        batch = [others[(step + j) % len(others)] for j in range(others_per_step[step])]
        pos = min(position_per_step[step], len(batch))
        batch.insert(pos, me)
        logits = torch.randn(len(batch), vocab, generator=other_gen) * 3
        logits[pos] = target_logits
        out = sampler(logits, state.build(batch))
        for r, t in zip(batch, out.sampled_token_ids.tolist()):
            r.output_token_ids.append(t)
    return me.output_token_ids


@pytest.mark.parametrize("target", TARGET_PARAMS, ids=["plain", "filtered"])
def test_seeded_request_is_independent_of_batch(target):
    steps = 8
    alone = run_seeded(target, 1234, steps, [0] * steps, [0] * steps, default_seed=0)
    in_batch = run_seeded(target, 1234, steps, [4] * steps, [2] * steps, default_seed=1)
    varying = run_seeded(target, 1234, steps, [5, 1, 3, 0, 6, 2, 4, 5], [0, 1, 3, 0, 6, 2, 4, 1],
                         default_seed=2)
    assert alone == in_batch == varying
    # The seed matters, and these are real draws rather than argmax.
    other_seed = run_seeded(target, 4321, steps, [0] * steps, [0] * steps, default_seed=0)
    assert other_seed != alone
    logit_gen = torch.Generator().manual_seed(42)
    argmaxes = [(torch.randn(500, generator=logit_gen) * 3).argmax().item() for _ in range(steps)]
    assert alone != argmaxes


def test_same_seed_same_logits_same_tokens_in_one_batch():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(5)).repeat(3, 1)
    params = SamplingParams(temperature=1.0)
    state = SamplingState(CPU, 300)
    reqs = [req("a", params, seed=11), req("b", params, seed=11), req("c", params, seed=12)]
    sampler = seeded_sampler()
    rows = [sampler(logits, state.build(reqs)).sampled_token_ids.tolist() for _ in range(6)]
    assert [r[0] for r in rows] == [r[1] for r in rows]
    assert [r[0] for r in rows] != [r[2] for r in rows]


# ---- the distribution ---------------------------------------------------------------------------

LOGITS = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])


def chi_square(draws: torch.Tensor, expected_probs: torch.Tensor) -> float:
    counts = torch.bincount(draws, minlength=len(expected_probs)).double()
    exp = expected_probs.double() * len(draws)
    support = exp > 0
    assert counts[~support].sum() == 0, "drew a token with probability 0"
    return float(((counts[support] - exp[support]) ** 2 / exp[support]).sum())


# 99.99th percentile of chi-square for 1..5 degrees of freedom.
CHI2_LIMIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7}


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_empirical_distribution_matches_softmax(temperature):
    n = 40_000
    md = metadata(n, temperature=temperature)
    draws = seeded_sampler(3)(LOGITS.repeat(n, 1), md).sampled_token_ids
    expected = (LOGITS / temperature).softmax(-1)
    assert chi_square(draws, expected) < CHI2_LIMIT[5]
    # The test can tell temperatures apart: the wrong temperature fails it.
    wrong = (LOGITS / (temperature * 1.3)).softmax(-1)
    assert chi_square(draws, wrong) > CHI2_LIMIT[5]


@pytest.mark.parametrize("kw,support", [(dict(top_k=3), [0, 1, 4]),
                                        (dict(min_p=0.2), [0, 1, 4]),
                                        (dict(top_p=0.8), [0, 1, 4])])
def test_empirical_distribution_after_filtering(kw, support):
    n = 40_000
    draws = seeded_sampler(4)(LOGITS.repeat(n, 1), metadata(n, **kw)).sampled_token_ids
    mask = torch.full_like(LOGITS, float("-inf"))
    mask[support] = 0
    expected = (LOGITS + mask).softmax(-1)
    assert chi_square(draws, expected) < CHI2_LIMIT[len(support) - 1]


def test_seeded_rows_sample_the_right_distribution():
    """Per-row generators (one per seeded request) also draw from softmax(logits / T)."""
    n = 3000
    logits = LOGITS[:4]
    reqs = [req(f"r{i}", SamplingParams(temperature=0.9), seed=i) for i in range(n)]
    md = SamplingState(CPU, 4).build(reqs)
    draws = seeded_sampler()(logits.repeat(n, 1), md).sampled_token_ids
    assert chi_square(draws, (logits / 0.9).softmax(-1)) < CHI2_LIMIT[3]


def test_seeded_request_draws_fresh_noise_every_step():
    """One seeded request over many steps with the same logits samples softmax(logits / T):
    its generator advances from step to step rather than replaying the same draw."""
    logits = LOGITS[:4][None]
    state = SamplingState(CPU, 4)
    sampler = seeded_sampler()
    me = req("r", SamplingParams(temperature=1.0), seed=77)
    draws = []
    for _ in range(1500):
        draws.append(sampler(logits, state.build([me])).sampled_token_ids.item())
    assert chi_square(torch.tensor(draws), logits[0].softmax(-1)) < CHI2_LIMIT[3]


# ---- logprobs -----------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_and_top_n_is_right():
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(6)) * 2
    params = [SamplingParams(temperature=0.8, logprobs=5, repetition_penalty=1.8),
              SamplingParams(temperature=0, logprobs=2, presence_penalty=1.0),
              SamplingParams(temperature=1.3, top_k=3)]
    top_token = logits.argmax(-1).tolist()
    reqs = [req(f"r{i}", p, prompt=[top_token[i]], output=[top_token[i]]) for i, p in enumerate(params)]
    md = SamplingState(CPU, vocab).build(reqs)
    assert md.max_num_logprobs == 5
    before = logits.clone()
    out = seeded_sampler()(logits, md)
    assert torch.equal(logits, before)  # the caller's logits are not modified in place
    # Penalties and temperature shape the choice, not the reported logprobs (as in vLLM).
    raw = torch.log_softmax(logits.double(), dim=-1)
    ref_vals, ref_ids = raw.topk(5, dim=-1)
    assert out.topk_token_ids.tolist() == ref_ids.tolist()
    assert (out.topk_logprobs.double() - ref_vals).abs().max() < 1e-5
    assert (out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:]).all()
    sampled = out.sampled_token_ids
    ref_sampled = raw.gather(-1, sampled[:, None]).squeeze(-1)
    assert (out.sampled_logprobs.double() - ref_sampled).abs().max() < 1e-5
    # Greedy row 1 was pushed off its argmax by the presence penalty; its logprob says so.
    assert sampled[1].item() != top_token[1]
    assert out.sampled_logprobs[1] < out.topk_logprobs[1, 0]


def test_logprobs_zero_and_none():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(7))
    md = SamplingState(CPU, 20).build([req("a", SamplingParams(temperature=0, logprobs=0)),
                                       req("b", SamplingParams(temperature=0))])
    out = seeded_sampler()(logits, md)
    # logprobs=0: only the sampled token's logprob.
    assert out.topk_logprobs is None and out.topk_token_ids is None
    assert out.sampled_logprobs[0].item() == pytest.approx(logits.log_softmax(-1).max(-1).values[0].item())
    md = SamplingState(CPU, 20).build([req("c", SamplingParams(temperature=0))])
    out = seeded_sampler()(logits[:1], md)
    assert out.sampled_logprobs is None and out.topk_logprobs is None


def test_sampled_logprob_is_consistent_with_sampling():
    """Sum of sampled logprobs ~ -entropy: a cheap check the two are of the same distribution."""
    n = 20_000
    md = metadata(n, temperature=1.0, max_num_logprobs=0)
    out = seeded_sampler(8)(LOGITS.repeat(n, 1), md)
    lp = LOGITS.log_softmax(-1)
    entropy = -(lp.exp() * lp).sum().item()
    assert out.sampled_logprobs.mean().item() == pytest.approx(-entropy, abs=0.03)
    assert math.isfinite(out.sampled_logprobs.sum().item())


def test_to_device_on_cpu_gives_the_values_in_the_dtype():
    from minivllm.runner.staging import to_device

    out = to_device([(0, 5), (1, 7)], torch.int64, torch.device("cpu"))
    assert out.dtype == torch.int64 and out.tolist() == [[0, 5], [1, 7]]
    assert to_device(np.arange(3, dtype=np.int32), torch.int64, torch.device("cpu")).dtype == torch.int64
