"""Scheduler driven by hand, with a simulated runner and a simulated paged KV cache.

The fake runner writes each scheduled token's id into the KV slot its block table names and,
before "sampling", reads every context position back through the block table. A scheduler or
block-manager mistake (a block reused while in use, a wrong prefix hit, a missing block) shows
up as a read that does not match the request's tokens. The next token is a hash of what was
read, so outputs also depend on the cache being right, as a real model's would.
"""

from __future__ import annotations

import random
import zlib
from typing import NamedTuple

import numpy as np
import pytest

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.request import Request, RequestStatus
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.scheduler_output import TOKEN_FROM_DEVICE, ModelRunnerOutput, SchedulerOutput
from minivllm.sampling_params import SamplingParams

class ScheduledStep(NamedTuple):
    """One step as the tests read it: the live requests scheduled and their token counts."""

    requests: list[Request]
    num_scheduled_tokens: list[int]


STEP_CAP = 5000  # far above what any test needs; reaching it means livelock


class Harness:
    """A scheduler plus a fake runner that checks every invariant a real runner relies on."""

    def __init__(self, *, num_blocks: int, block_size: int = 4, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 64, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, overlap: bool = False) -> None:
        # overlap: results are applied one step late, as the engine does with async scheduling;
        # the harness then plays the device too (it holds the in-flight tokens).
        self.overlap = overlap
        self.in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
        self.num_device_tokens = 0  # input ids the scheduler could not know (overlap only)
        if max_model_len is None:
            max_model_len = num_blocks * block_size
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
        self.kv = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(self.config, self.kv)
        self.cache = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self.requests: dict[str, Request] = {}
        self.finished: list[str] = []
        self.admission_order: list[str] = []
        self.admission_hit_tokens = 0  # cached tokens found at admissions, resumptions included
        self.num_steps = 0

    def add(self, rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
        self.sched.check_fits(len(prompt))
        req = Request(request_id=rid, prompt_token_ids=list(prompt),
                      params=SamplingParams(max_tokens=max_tokens), arrival_time=float(len(self.requests)))
        self.requests[rid] = req
        self.sched.add_request(req)
        return req

    def slots(self, req: Request, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        bs = self.kv.block_size
        pos = np.arange(start, end)
        return np.asarray(req.block_ids, dtype=np.int64)[pos // bs], pos % bs

    def step(self) -> tuple[ScheduledStep, list[Request]]:
        self.num_steps += 1
        was_running = {r.request_id for r in self.sched.running}
        starts = {r.request_id: r.num_computed_tokens for r in self.sched.running}
        plain = self.sched.schedule()
        out = ScheduledStep([self.requests[rid] for rid in plain.req_ids], plain.num_scheduled_tokens)
        self.check_schedule(out, plain)
        # Tokens sampled by the step in flight, which only "the device" knows yet.
        on_device = dict(zip(self.in_flight[1].req_ids, self.in_flight[1].token_ids)) if self.in_flight else {}

        def truth(req: Request) -> list[int]:
            return req.all_token_ids + ([on_device[req.request_id]] if req.request_id in on_device else [])

        for req, c in zip(out.requests, plain.num_computed_tokens):
            if req.request_id not in was_running:
                self.admission_order.append(req.request_id)
                self.admission_hit_tokens += c
            else:
                assert c == starts[req.request_id]
        # The plain data says exactly which tokens to feed; unknown ones come from the device.
        fed = [on_device[plain.req_ids[row]] if t == TOKEN_FROM_DEVICE else t
               for row, n in enumerate(out.num_scheduled_tokens)
               for t in plain.token_ids[sum(out.num_scheduled_tokens[:row]):][:n]]
        flat = [t for req, c, n in zip(out.requests, plain.num_computed_tokens, out.num_scheduled_tokens)
                for t in truth(req)[c:c + n]]
        assert fed == flat
        self.num_device_tokens += plain.token_ids.count(TOKEN_FROM_DEVICE)
        if not self.overlap:
            assert self.num_device_tokens == 0
        # Runner: write the new tokens' K/V ...
        for req, c, n in zip(out.requests, plain.num_computed_tokens, out.num_scheduled_tokens):
            blocks, offsets = self.slots(req, c, c + n)
            self.cache[blocks, offsets] = truth(req)[c:c + n]
        # ... then attention reads the whole context of every scheduled request.
        next_tokens = {}
        for req, c, n in zip(out.requests, plain.num_computed_tokens, out.num_scheduled_tokens):
            end = c + n
            blocks, offsets = self.slots(req, 0, end)
            seen = self.cache[blocks, offsets]
            assert seen.tolist() == truth(req)[:end], f"{req.request_id} read wrong K/V"
            next_tokens[req.request_id] = 1 + zlib.crc32(seen.tobytes()) % 997
        ids = [plain.req_ids[i] for i in plain.sampling_rows]
        result = ModelRunnerOutput(ids, [next_tokens[r] for r in ids], [None] * len(ids),
                                   [None] * len(ids))
        if self.overlap:
            done, self.in_flight = self.in_flight, ((plain, result) if ids else None)
        else:
            done = (plain, result)
        sampled = []
        if done is not None:
            for req, _ in self.sched.update_from_output(*done):
                sampled.append(req)
                assert req.num_output_tokens <= req.params.max_tokens
                if (req.num_output_tokens >= req.params.max_tokens
                        or req.num_known_tokens >= self.config.max_model_len):
                    self.sched.finish(req, "length")
                    self.finished.append(req.request_id)
        self.check_block_accounting()
        return out, sampled

    def run_to_completion(self) -> None:
        while self.sched.has_unfinished or self.in_flight is not None:
            assert self.num_steps < STEP_CAP, "scheduler livelock: no progress"
            self.step()

    # ---- invariants ----------------------------------------------------------------------
    def check_schedule(self, out: ScheduledStep, plain: SchedulerOutput) -> None:
        assert len(out.requests) == len(out.num_scheduled_tokens)
        assert len({id(r) for r in out.requests}) == len(out.requests), "request scheduled twice"
        assert plain.total_tokens <= self.config.max_num_batched_tokens
        assert len(self.sched.running) <= self.config.max_num_seqs
        for req, c, n in zip(out.requests, plain.num_computed_tokens, out.num_scheduled_tokens):
            assert n >= 1
            assert req.status == RequestStatus.RUNNING and req in self.sched.running
            assert c + n == req.num_computed_tokens <= req.num_tokens
            assert len(req.block_ids) >= self.kv.blocks_needed(c + n)
            # Never a token beyond max_tokens, even with one in flight.
            assert req.num_pending_output_tokens <= req.params.max_tokens

    def check_block_accounting(self) -> None:
        holders = [0] * self.kv.num_blocks
        for req in list(self.sched.running) + list(self.sched.waiting):
            assert len(set(req.block_ids)) == len(req.block_ids)
            for b in req.block_ids:
                holders[b] += 1
        for req in self.requests.values():
            if req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.FINISHED):
                assert req.block_ids == [], f"{req.request_id} holds blocks while not running"
        for block in self.kv.blocks:
            assert block.ref_count == holders[block.block_id], f"block {block.block_id} ref count"
            assert (block.block_id in self.kv.free_queue) == (block.ref_count == 0)
        for h, b in self.kv.hash_to_block.items():
            assert self.kv.blocks[b].block_hash == h


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


# ---- batching -----------------------------------------------------------------------------

def test_empty_schedule():
    h = Harness(num_blocks=8)
    out = h.sched.schedule()
    assert out.is_empty and out.total_tokens == 0 and not h.sched.has_unfinished


def test_decode_and_prefill_in_same_step():
    h = Harness(num_blocks=32, max_num_batched_tokens=64)
    a = h.add("a", prompt(1, 10), max_tokens=8)
    out, sampled = h.step()
    assert out.requests == [a] and out.num_scheduled_tokens == [10]
    assert sampled == [a] and a.num_output_tokens == 1
    b = h.add("b", prompt(2, 20), max_tokens=8)
    out, sampled = h.step()
    # a decodes one token while b's whole prompt is prefilled, in one step.
    assert out.requests == [a, b] and out.num_scheduled_tokens == [1, 20]
    assert sampled == [a, b]
    h.run_to_completion()
    assert sorted(h.finished) == ["a", "b"]


def test_chunked_prefill_of_a_long_prompt():
    h = Harness(num_blocks=32, max_num_batched_tokens=16)
    a = h.add("a", prompt(3, 50), max_tokens=3)
    chunks = []
    for _ in range(4):
        out, sampled = h.step()
        chunks.append(out.num_scheduled_tokens)
        # Nothing is sampled until the last prompt token has been computed.
        assert sampled == ([a] if a.num_computed_tokens == 50 else [])
    assert chunks == [[16], [16], [16], [2]]
    assert a.num_output_tokens == 1
    h.run_to_completion()
    assert a.num_output_tokens == 3


def test_chunked_prefill_shares_budget_with_decodes():
    h = Harness(num_blocks=64, max_num_batched_tokens=16)
    a = h.add("a", prompt(4, 5), max_tokens=20)
    h.step()
    b = h.add("b", prompt(5, 40), max_tokens=2)
    steps = []
    while b.num_output_tokens == 0:
        out, _ = h.step()
        steps.append(list(zip([r.request_id for r in out.requests], out.num_scheduled_tokens)))
    # a decodes every step; b gets the rest of the budget until its prompt is done.
    assert steps == [[("a", 1), ("b", 15)], [("a", 1), ("b", 15)], [("a", 1), ("b", 10)]]
    h.run_to_completion()
    assert a.num_output_tokens == 20 and b.num_output_tokens == 2


def test_max_num_seqs_is_respected():
    h = Harness(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=256)
    reqs = [h.add(f"r{i}", prompt(10 + i, 6), max_tokens=3) for i in range(5)]
    out, _ = h.step()
    assert out.requests == reqs[:2]
    while h.sched.has_unfinished:
        out, _ = h.step()
        assert len(out.requests) <= 2  # check_schedule also asserts len(running) <= 2
    assert h.finished == [f"r{i}" for i in range(5)]


def test_fcfs_admission_order():
    h = Harness(num_blocks=64, max_num_batched_tokens=8)
    for i in range(4):
        h.add(f"r{i}", prompt(20 + i, 8), max_tokens=2)
    out, _ = h.step()
    assert [r.request_id for r in out.requests] == ["r0"]  # the budget holds exactly one prompt
    h.run_to_completion()
    assert h.admission_order == ["r0", "r1", "r2", "r3"]


def test_fcfs_head_of_line_is_not_overtaken():
    """A waiting request that does not fit in the free blocks is not skipped by a later one."""
    h = Harness(num_blocks=6, max_num_batched_tokens=64)
    big_running = h.add("a", prompt(30, 12), max_tokens=4)  # 3 blocks + 1 for decode
    h.step()
    h.add("b", prompt(31, 12), max_tokens=1)  # needs 3 blocks, only 2 free
    h.add("c", prompt(32, 2), max_tokens=1)  # would fit
    out, _ = h.step()
    assert out.requests == [big_running]
    h.run_to_completion()
    assert h.admission_order == ["a", "b", "c"]


def test_request_finishes_at_max_model_len():
    h = Harness(num_blocks=16, max_model_len=20)
    a = h.add("a", prompt(40, 17), max_tokens=100)
    h.run_to_completion()
    assert a.num_tokens == 20 and a.finish_reason == "length"


# ---- preemption -------------------------------------------------------------------------

def test_preempts_newest_and_resumed_request_hits_its_own_cached_blocks():
    h = Harness(num_blocks=5, max_num_batched_tokens=64)
    a = h.add("a", prompt(50, 7), max_tokens=4)
    b = h.add("b", prompt(51, 7), max_tokens=6)
    h.step()  # both prefilled: 2 blocks each, 1 left
    h.step()  # both decode within their 2nd block; after it, 2 full (cached) blocks each
    b_blocks = list(b.block_ids)
    b_hashed = [h.kv.blocks[i].block_hash for i in b_blocks]
    assert all(x is not None for x in b_hashed)
    out, _ = h.step()  # both need a 3rd block, one exists: the newer request, b, yields
    assert out.requests == [a]
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert h.sched.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.block_ids == [] and list(h.sched.waiting) == [b]
    tokens_at_preemption = list(b.all_token_ids)

    while b.status != RequestStatus.RUNNING:
        out, _ = h.step()
    # Resumed: its two full blocks came back from the prefix cache (same physical blocks),
    # only the one uncomputed token is recomputed.
    assert a.is_finished
    assert b.block_ids[:2] == b_blocks
    assert out.requests[-1] is b and out.num_scheduled_tokens[-1] == 1
    # That step completed its sequence, so it sampled the next token right away.
    assert b.all_token_ids[:-1] == tokens_at_preemption
    # A resumed prompt is not counted again in the hit statistics.
    assert h.kv.prefix_cache_queries == 14 and h.kv.prefix_cache_hits == 0
    h.run_to_completion()
    assert b.num_output_tokens == 6 and h.finished == ["a", "b"]


def test_preemption_picks_newest_not_the_requester():
    h = Harness(num_blocks=7, max_num_batched_tokens=64)
    a = h.add("a", prompt(60, 7), max_tokens=10)
    b = h.add("b", prompt(61, 7), max_tokens=10)
    c = h.add("c", prompt(62, 7), max_tokens=10)
    h.step()
    d = h.add("d", prompt(63, 5), max_tokens=1)  # needs 2 blocks, 1 is free: waits
    out, _ = h.step()
    assert out.requests == [a, b, c]
    out, _ = h.step()  # a takes the free block; b needs one too: c (newest) is preempted
    assert out.requests == [a, b]
    assert c.status == RequestStatus.PREEMPTED
    assert a.status == b.status == RequestStatus.RUNNING
    assert list(h.sched.waiting) == [c, d]  # the preempted request keeps its place ahead of d
    h.run_to_completion()
    assert [rid for rid in h.admission_order if rid in "cd"] == ["c", "c", "d"]
    assert d.is_finished and c.num_output_tokens == 10


def test_space_freed_by_preemption_is_not_given_to_a_newer_request():
    """Admitting new work right after a preemption would only thrash (and overtake)."""
    h = Harness(num_blocks=5, max_num_batched_tokens=64)
    h.add("a", prompt(70, 7), max_tokens=10)
    h.add("b", prompt(71, 7), max_tokens=10)
    h.step()
    h.step()
    h.add("small", [5], max_tokens=1)  # fits in either of the blocks b is about to free
    out, _ = h.step()
    assert h.sched.num_preemptions == 1
    assert [r.request_id for r in out.requests] == ["a"]
    assert h.kv.num_free_blocks == 2 and [r.request_id for r in h.sched.waiting] == ["b", "small"]


def test_shared_prefix_requests_share_blocks():
    h = Harness(num_blocks=32, max_num_batched_tokens=64)
    shared = prompt(80, 12)
    a = h.add("a", shared + [1], max_tokens=5)
    h.step()
    b = h.add("b", shared + [2, 3], max_tokens=5)
    out, _ = h.step()
    assert out.requests == [a, b] and out.num_scheduled_tokens == [1, 2]
    assert b.block_ids[:3] == a.block_ids[:3]
    assert [h.kv.blocks[i].ref_count for i in a.block_ids[:3]] == [2, 2, 2]
    assert b.num_cached_tokens == 12
    assert h.kv.prefix_cache_queries == 13 + 14 and h.kv.prefix_cache_hits == 12
    h.run_to_completion()
    assert h.kv.num_free_blocks == 32


def test_identical_prompt_after_finish_hits_all_but_last_block():
    h = Harness(num_blocks=32, max_num_batched_tokens=64)
    p = prompt(90, 8)  # exactly two blocks
    h.add("a", p, max_tokens=1)
    h.run_to_completion()
    b = h.add("b", p, max_tokens=1)
    out, _ = h.step()
    # Everything is cached, yet one block's worth is recomputed so the last token has logits.
    assert b.num_cached_tokens == 4 and out.num_scheduled_tokens == [4]
    h.run_to_completion()
    assert h.requests["a"].output_token_ids == b.output_token_ids


# ---- cache exhaustion ---------------------------------------------------------------------

def workload(seed: int, n: int = 16) -> list[tuple[str, list[int], int]]:
    rng = random.Random(seed)
    prefixes = [prompt(seed * 100 + k, 8) for k in range(2)]
    out = []
    for i in range(n):
        suffix = [rng.randrange(1000, 30000) for _ in range(rng.randrange(1, 14))]
        p = (rng.choice(prefixes) + suffix) if rng.random() < 0.5 else suffix
        out.append((f"r{i}", p, rng.randrange(1, 24)))
    return out


def run_workload(reqs, **kw) -> Harness:
    h = Harness(**kw)
    for rid, p, max_tokens in reqs:
        h.add(rid, p, max_tokens)
    h.run_to_completion()
    return h


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_exhaustion_all_finish_with_same_outputs(seed, enable_prefix_caching, overlap):
    """Roomy vs tight cache (preemption, chunking), results applied at once or one step late
    (overlapped scheduling): every request ends with the same tokens."""
    reqs = workload(seed)
    roomy = run_workload(reqs, num_blocks=256, max_model_len=40, max_num_batched_tokens=512,
                         max_num_seqs=64, enable_prefix_caching=enable_prefix_caching)
    tight = run_workload(reqs, num_blocks=10, max_model_len=40, max_num_batched_tokens=12,
                         max_num_seqs=8, enable_prefix_caching=enable_prefix_caching,
                         overlap=overlap)
    assert roomy.sched.num_preemptions == 0
    assert tight.sched.num_preemptions > 0
    assert (tight.num_device_tokens > 0) == overlap
    for rid, p, max_tokens in reqs:
        r = tight.requests[rid]
        assert r.is_finished and r.finish_reason == "length"
        assert r.num_output_tokens == min(max_tokens, 40 - len(p))
        assert r.output_token_ids == roomy.requests[rid].output_token_ids
    for h in (roomy, tight):
        assert h.kv.num_free_blocks == h.kv.num_blocks and not h.sched.running
    if enable_prefix_caching:
        # Late admissions and resumptions find cached blocks (the roomy run admits everything
        # at once, before anything is cached).
        assert tight.admission_hit_tokens > 0
    else:
        assert tight.kv.prefix_cache_hits == roomy.kv.prefix_cache_hits == 0
        assert tight.admission_hit_tokens == 0


def test_many_requests_one_block_spare():
    """The smallest cache that fits the longest sequence: heavy preemption, still no crash."""
    reqs = [(f"r{i}", prompt(200 + i, 3 + i % 5), 9) for i in range(20)]
    h = run_workload(reqs, num_blocks=4, max_model_len=16, max_num_batched_tokens=16, max_num_seqs=20)
    assert all(h.requests[rid].is_finished for rid, _, _ in reqs)
    assert h.sched.num_preemptions > 0


# ---- admission checks -------------------------------------------------------------------

def test_check_fits_rejects_prompt_at_or_over_max_model_len():
    h = Harness(num_blocks=64, max_model_len=32)
    h.sched.check_fits(31)
    for n in (32, 33, 1000):
        with pytest.raises(ValueError, match="max_model_len"):
            h.sched.check_fits(n)


def test_check_fits_rejects_prompt_needing_more_blocks_than_exist():
    # A max_model_len the cache cannot hold is refused up front (else: self-preemption forever).
    with pytest.raises(ValueError, match="capacity"):
        Harness(num_blocks=4, block_size=4, max_model_len=1000)
    h = Harness(num_blocks=4, block_size=4, max_model_len=16)
    h.sched.check_fits(15)  # 15 + 1 generated token = 16 = 4 blocks
    with pytest.raises(ValueError):
        h.sched.check_fits(16)
    with pytest.raises(ValueError):
        h.sched.check_fits(100)
