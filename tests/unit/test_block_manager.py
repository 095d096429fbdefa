"""Block manager: chained prefix hashes, sharing by reference count, LRU reuse of freed blocks.

Pure CPU and model-free: a request's blocks are "computed" by setting ``num_computed_tokens``
and calling ``cache_computed_blocks``, as the scheduler does after a step.
"""

from __future__ import annotations

import pytest

from minivllm.engine.block_manager import BlockManager, hash_block
from minivllm.engine.request import Request
from minivllm.sampling_params import SamplingParams

BS = 4  # small blocks keep the token lists readable; nothing here depends on the size


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams(),
                   arrival_time=0.0)


def compute(bm: BlockManager, req: Request) -> None:
    """Admit ``req`` as the scheduler does (prefix hit + new blocks) and 'run' all its tokens."""
    cached = bm.find_cached_prefix(req)
    n = req.num_tokens - len(cached) * BS
    assert bm.allocate(req, n, cached)
    req.num_computed_tokens = len(cached) * BS + n
    bm.cache_computed_blocks(req)


def snapshot(bm: BlockManager) -> tuple:
    return (list(bm.free_queue), [(b.ref_count, b.block_hash, b.token_ids) for b in bm.blocks],
            dict(bm.hash_to_block), bm.prefix_cache_queries, bm.prefix_cache_hits)


# ---- hashing ----------------------------------------------------------------------------

def test_hash_is_deterministic_and_chained():
    tokens = [11, 12, 13, 14]
    assert hash_block(None, tokens) == hash_block(None, list(tokens)) == hash_block(None, tuple(tokens))
    h1 = hash_block(None, [1, 2, 3, 4])
    h2 = hash_block(None, [5, 6, 7, 8])
    # Same tokens under a different parent are a different prefix, so a different hash.
    assert hash_block(h1, tokens) != hash_block(h2, tokens)
    assert hash_block(h1, tokens) != hash_block(None, tokens)
    # Order and content of the tokens matter.
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [4, 3, 2, 1])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])
    # Large ids (beyond 16/32 bits) are not truncated into each other.
    assert hash_block(None, [2**40 + 1]) != hash_block(None, [1])


def test_request_block_hashes_are_chained():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request("a", list(range(10)))
    compute(bm, req)
    h0 = hash_block(None, [0, 1, 2, 3])
    assert req.block_hashes[:2] == [h0, hash_block(h0, [4, 5, 6, 7])]
    # The partial third block is never hashed or registered.
    assert len(bm.hash_to_block) == 2
    assert bm.blocks[req.block_ids[2]].block_hash is None


def test_same_block_tokens_under_different_prefix_do_not_hit():
    bm = BlockManager(num_blocks=8, block_size=BS)
    compute(bm, make_request("a", [1, 2, 3, 4, 9, 9, 9, 9, 0]))
    # Second block identical, first block different: the chain means nothing is reusable.
    other = make_request("b", [5, 6, 7, 8, 9, 9, 9, 9, 0])
    assert bm.find_cached_prefix(other) == []
    # Shared first block only: exactly one block hits.
    partial = make_request("c", [1, 2, 3, 4, 7, 7, 7, 7, 0])
    assert len(bm.find_cached_prefix(partial)) == 1


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.find_cached_prefix(b) == a.block_ids[:2]
    # Pretend the cached first block holds other tokens under the same hash (a collision).
    bm.blocks[a.block_ids[0]].token_ids = (1, 2, 3, 99)
    assert bm.find_cached_prefix(make_request("c", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    # A collision on the second block still serves the (genuine) first one.
    bm.blocks[a.block_ids[0]].token_ids = (1, 2, 3, 4)
    bm.blocks[a.block_ids[1]].token_ids = (5, 6, 7, 0)
    assert bm.find_cached_prefix(make_request("d", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == a.block_ids[:1]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute(bm, make_request("a", list(range(9))))
    assert bm.hash_to_block == {}
    assert bm.find_cached_prefix(make_request("b", list(range(9)))) == []


# ---- sharing and reference counts -------------------------------------------------------

def test_shared_prefix_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    a = make_request("a", prefix + [10, 11])
    compute(bm, a)
    b = make_request("b", prefix + [20, 21, 22])
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_ids[:2]
    free_before = bm.num_free_blocks
    assert bm.allocate(b, b.num_tokens - 2 * BS, cached)
    # Shared blocks are not taken from the free queue twice; b needs one new block only.
    assert b.block_ids[:2] == a.block_ids[:2]
    assert bm.num_free_blocks == free_before - 1
    assert [bm.blocks[i].ref_count for i in a.block_ids] == [2, 2, 1]
    assert bm.blocks[b.block_ids[2]].ref_count == 1
    assert b.block_ids[2] != a.block_ids[2]

    bm.free(a)
    assert a.block_ids == []
    # b still holds the shared blocks: they must not be free (or reusable) yet.
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1]
    for i in b.block_ids:
        assert i not in bm.free_queue
    bm.free(b)
    assert all(blk.ref_count == 0 for blk in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks


def test_freed_blocks_keep_their_hash_and_still_hit():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(100, 110)))
    compute(bm, a)
    head = a.block_ids[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6
    for i in head:
        assert bm.blocks[i].block_hash is not None and bm.blocks[i].ref_count == 0
    b = make_request("b", list(range(100, 110)))
    cached = bm.find_cached_prefix(b)
    assert cached == head
    assert bm.allocate(b, b.num_tokens - 2 * BS, cached)
    # Reclaimed from the free queue, counted once.
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1]
    assert bm.num_free_blocks == 3
    assert not set(b.block_ids) & set(bm.free_queue)


def test_same_block_computed_twice_keeps_first_registration():
    """Two requests that computed the same prefix independently: one block stays registered,
    and freeing either never drops the other's mapping."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5])
    b = make_request("b", [1, 2, 3, 4, 6])
    # Both allocated before either is hashed (same step): no sharing possible.
    assert bm.allocate(a, 5) and bm.allocate(b, 5)
    a.num_computed_tokens = b.num_computed_tokens = 5
    bm.cache_computed_blocks(a)
    bm.cache_computed_blocks(b)
    h = hash_block(None, [1, 2, 3, 4])
    assert bm.hash_to_block == {h: a.block_ids[0]}
    bm.free(b)
    # Reuse all free blocks: b's (unhashed) copy is evicted, a's mapping must survive.
    hog = make_request("hog", [0] * (bm.num_free_blocks * BS))
    assert bm.allocate(hog, hog.num_tokens)
    assert bm.hash_to_block == {h: a.block_ids[0]}
    assert bm.find_cached_prefix(make_request("c", [1, 2, 3, 4, 7])) == a.block_ids[:1]


def test_hit_is_a_contiguous_prefix_from_the_first_block():
    """A later block that is still cached is useless once an earlier one is gone: serving it
    would put its K/V at the wrong positions."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 0])
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    # Same step: both compute block [1, 2, 3, 4]; a's copy is registered, b's second block too.
    assert bm.allocate(a, a.num_tokens) and bm.allocate(b, b.num_tokens)
    a.num_computed_tokens, b.num_computed_tokens = a.num_tokens, b.num_tokens
    bm.cache_computed_blocks(a)
    bm.cache_computed_blocks(b)
    assert bm.blocks[b.block_ids[1]].block_hash is not None
    bm.free(a)
    hog = make_request("hog", [9] * (bm.num_free_blocks * BS))
    assert bm.allocate(hog, hog.num_tokens)  # evicts a's copy of the first block
    assert hash_block(None, [1, 2, 3, 4]) not in bm.hash_to_block
    assert bm.find_cached_prefix(make_request("c", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == []


# ---- full-prefix hit --------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,expected_hit_blocks", [(8, 1), (9, 2), (12, 2), (13, 3), (4, 0),
                                                            (5, 1)])
def test_fully_cached_prompt_leaves_one_token_to_compute(num_tokens, expected_hit_blocks):
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(50, 50 + num_tokens))
    compute(bm, make_request("a", tokens + [0, 0, 0, 0]))  # every block of the prompt cached
    b = make_request("b", tokens)
    hits = bm.find_cached_prefix(b)
    assert len(hits) == expected_hit_blocks
    assert len(hits) * BS < b.num_tokens


# ---- allocation failure and accounting --------------------------------------------------

def test_allocate_failure_changes_nothing():
    bm = BlockManager(num_blocks=5, block_size=BS)
    a = make_request("a", list(range(9)))
    compute(bm, a)
    bm.free(a)  # 2 hashed blocks + 1 unhashed now free
    hog = make_request("hog", [77] * 8)
    assert bm.allocate(hog, 8)  # 2 blocks in use; 3 free, 2 of them hold a's cached prefix
    b = make_request("b", list(range(9)) + [5] * 8)  # 17 tokens = 5 blocks, 2 cached
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2
    before = snapshot(bm)
    assert not bm.can_allocate(b, b.num_tokens - 2 * BS, cached)
    assert bm.allocate(b, b.num_tokens - 2 * BS, cached) is False
    assert snapshot(bm) == before
    assert b.block_ids == [] and b.num_registered_blocks == 0
    # And a request that exactly fits still succeeds afterwards (3 free: 2 cached + 1 new).
    c = make_request("c", list(range(9)))
    assert bm.allocate(c, 1, bm.find_cached_prefix(c))
    assert bm.num_free_blocks == 0


def test_reclaiming_cached_free_blocks_uses_free_capacity():
    """A hit on a freed block takes it out of the free queue: it is not extra capacity."""
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(8)) + [0])
    compute(bm, a)
    bm.free(a)
    hog = make_request("hog", [1] * 4)
    assert bm.allocate(hog, 4)  # takes the unhashed free block; 2 cached blocks remain free
    b = make_request("b", list(range(8)) + [0, 0])
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2
    assert not bm.allocate(b, 2, cached)  # needs 1 more block beyond the 2 cached ones
    c = make_request("c", list(range(8)) + [0])
    assert bm.allocate(c, 1, bm.find_cached_prefix(c)) is False  # 9 tokens need a 3rd block too
    d = make_request("d", list(range(8)))
    # 8 tokens: hits 1 block (one token left to compute), needs 1 more: fits in the 2 free.
    cached_d = bm.find_cached_prefix(d)
    assert len(cached_d) == 1
    assert bm.allocate(d, 4, cached_d)
    assert bm.num_free_blocks == 0


def test_decode_growth_allocates_one_block_per_block_size_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request("a", [1, 2, 3])
    assert bm.allocate(req, 3)
    assert len(req.block_ids) == 1
    req.num_computed_tokens = 3
    for step, expected_blocks in enumerate([1, 2, 2, 2, 2, 3]):
        req.output_token_ids.append(1000 + step)
        assert bm.allocate(req, 1)
        req.num_computed_tokens += 1
        bm.cache_computed_blocks(req)
        assert len(req.block_ids) == expected_blocks
    assert len(set(req.block_ids)) == len(req.block_ids)
    # Blocks filled with generated tokens are cached too (the chain crosses prompt/output).
    h0 = hash_block(None, [1, 2, 3, 1000])
    assert req.block_hashes[:2] == [h0, hash_block(h0, [1001, 1002, 1003, 1004])]
    assert bm.hash_to_block[h0] == req.block_ids[0]


def test_lookup_counters():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    bm.record_lookup(10, 8)
    bm.record_lookup(6, 0)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (16, 8)


def test_usage():
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.usage == 0.0
    req = make_request("a", [1] * 6)
    assert bm.allocate(req, 6)
    assert bm.usage == pytest.approx(0.5)
    bm.free(req)
    assert bm.usage == 0.0


# ---- LRU eviction order -----------------------------------------------------------------

def test_eviction_order_unhashed_first_then_least_recently_freed_tail_first():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))  # blocks: a0, a1 full (hashed), a2 partial
    b = make_request("b", list(range(100, 110)))  # b0, b1 hashed, b2 partial
    compute(bm, a)
    compute(bm, b)
    a_ids, b_ids = list(a.block_ids), list(b.block_ids)
    never_used = [i for i in range(8) if i not in a_ids + b_ids]
    bm.free(a)  # freed first: its cached blocks are older in the LRU
    bm.free(b)
    assert bm.num_free_blocks == 8

    # Take blocks one at a time and record which physical block each allocation reuses.
    hog = make_request("hog", [])
    order = []
    for _ in range(8):
        hog.prompt_token_ids.extend([7] * BS)
        assert bm.allocate(hog, BS)
        hog.num_computed_tokens += BS
        order.append(hog.block_ids[-1])

    unhashed = set(never_used) | {a_ids[2], b_ids[2]}
    assert set(order[:4]) == unhashed  # blocks with no cached content go first
    # Then cached blocks: a (freed earlier) before b, and within each request tail before head.
    assert order[4:] == [a_ids[1], a_ids[0], b_ids[1], b_ids[0]]


def test_cached_blocks_survive_until_evicted():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(12)) + [0])  # 3 hashed blocks + 1 partial
    compute(bm, a)
    a_ids = list(a.block_ids)
    bm.free(a)
    probe = list(range(12)) + [0]

    def hit_blocks() -> int:
        return len(bm.find_cached_prefix(make_request("p", probe)))

    hog = make_request("hog", [])

    def take_one() -> int:
        hog.prompt_token_ids.extend([9] * BS)
        assert bm.allocate(hog, BS)
        hog.num_computed_tokens += BS
        return hog.block_ids[-1]

    # 3 unhashed free blocks (2 never used + a's partial): the whole prefix survives them.
    for _ in range(3):
        assert take_one() not in a_ids[:3]
        assert hit_blocks() == 3
    # Then the tail goes first, so the longest shared prefix is kept as long as possible.
    assert take_one() == a_ids[2]
    assert hit_blocks() == 2
    assert take_one() == a_ids[1]
    assert hit_blocks() == 1
    assert take_one() == a_ids[0]
    assert hit_blocks() == 0
    assert bm.hash_to_block == {}


def test_hit_refreshes_lru_position():
    """A cached block that is reused and freed again becomes the most recently freed."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", [1, 1, 1, 1, 0])
    b = make_request("b", [2, 2, 2, 2, 0])
    compute(bm, a)
    compute(bm, b)
    a0, b0 = a.block_ids[0], b.block_ids[0]
    bm.free(a)
    bm.free(b)
    # Reuse a's cached block, then free it again: now b's block is the older one.
    a2 = make_request("a2", [1, 1, 1, 1, 0])
    cached = bm.find_cached_prefix(a2)
    assert cached == [a0]
    assert bm.allocate(a2, 1, cached)
    bm.free(a2)
    hog = make_request("hog", [5] * (3 * BS))
    assert bm.allocate(hog, 3 * BS)  # 2 unhashed blocks and then the oldest cached one
    assert b0 in hog.block_ids and a0 not in hog.block_ids
    assert len(bm.find_cached_prefix(make_request("x", [1, 1, 1, 1, 0]))) == 1
    assert bm.find_cached_prefix(make_request("y", [2, 2, 2, 2, 0])) == []


def test_reset_prefix_cache_forgets_hashes():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))
    compute(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.find_cached_prefix(make_request("b", list(range(9)))) == []
    assert bm.num_free_blocks == 4
