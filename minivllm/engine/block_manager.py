"""Paged KV-cache block allocator with prefix caching.

Full blocks are identified by a chained xxhash of (parent block hash, token ids), so a block
hash names the whole prefix up to and including it. Lookups also compare token ids, so a hash
collision can never serve wrong K/V. Blocks are hashed lazily, after the step that filled them
has run, so a hit never points at K/V that is still being computed.

Free blocks sit in one LRU queue. A freed block keeps its hash: it can still be hit until it is
reused. Hashed blocks are queued at the back (evicted last) and tail blocks of a request before
its head, so long shared prefixes survive the longest; unhashed blocks go to the front.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import xxhash

from minivllm.engine.request import Request


def hash_block(parent_hash: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    """Chained 64-bit xxhash of a full block's tokens and its parent's hash."""
    h = xxhash.xxh64()
    h.update((parent_hash if parent_hash is not None else 0).to_bytes(8, "little", signed=False))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # set with the hash, for the equality check


class BlockManager:
    """Allocates fixed-size blocks to requests and shares cached prefix blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which served from the cache

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _ensure_hashes(self, req: Request, num_tokens: int) -> None:
        """Extend ``req.block_hashes`` to cover every full block within ``num_tokens``."""
        bs = self.block_size
        while (len(req.block_hashes) + 1) * bs <= num_tokens:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if i else None
            req.block_hashes.append(hash_block(parent, req.token_slice(i * bs, (i + 1) * bs)))

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Block ids of the longest cached prefix of ``req``'s tokens.

        At least one token is always left to compute (its logits are needed), so a prompt that
        is entirely cached reuses all but its last block.
        """
        if not self.enable_prefix_caching:
            return []
        max_cached_tokens = req.num_tokens - 1
        self._ensure_hashes(req, max_cached_tokens)
        bs = self.block_size
        hits: list[int] = []
        for i, h in enumerate(req.block_hashes[: max_cached_tokens // bs]):
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            if self.blocks[block_id].token_ids != tuple(req.token_slice(i * bs, (i + 1) * bs)):
                break  # a hash collision: never serve another prefix's K/V
            hits.append(block_id)
        return hits

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        needed = self.blocks_needed(req.num_computed_tokens + len(cached_blocks) * self.block_size
                                    + num_new_tokens) - len(req.block_ids) - len(cached_blocks)
        # Cached blocks with no owner sit in the free queue; taking them uses free capacity too.
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return max(needed, 0) + reclaimed <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give ``req`` the cached prefix blocks plus enough new blocks for ``num_new_tokens``
        more tokens. Returns False (and changes nothing) when the cache is too full."""
        if not cached_blocks and (req.num_computed_tokens + num_new_tokens
                                  <= len(req.block_ids) * self.block_size):
            return True  # the common decode case: the last block still has room
        if not self.can_allocate(req, num_new_tokens, cached_blocks):
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            req.block_ids.append(block_id)
        req.num_registered_blocks += len(cached_blocks)
        total = req.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        while len(req.block_ids) < self.blocks_needed(total):
            req.block_ids.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evicting a cached block: forget its hash so nobody else maps onto it.
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = None
        block.ref_count = 1
        return block_id

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks; cached ones stay hittable until evicted."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        req.block_ids = []
        req.num_registered_blocks = 0

    def cache_computed_blocks(self, req: Request) -> None:
        """Register hashes for ``req``'s blocks that are now full of computed K/V (of known
        tokens: a block holding an in-flight placeholder waits for its token)."""
        num_full = min(req.num_computed_tokens, req.num_known_tokens) // self.block_size
        if not self.enable_prefix_caching or num_full <= req.num_registered_blocks:
            return  # nothing newly full (most decode steps)
        self._ensure_hashes(req, num_full * self.block_size)
        bs = self.block_size
        for i in range(req.num_registered_blocks, num_full):
            block = self.blocks[req.block_ids[i]]
            if block.block_hash is not None:
                continue
            h = req.block_hashes[i]
            if h in self.hash_to_block:
                continue  # another request computed the same block first; keep theirs
            block.block_hash = h
            block.token_ids = tuple(req.token_slice(i * bs, (i + 1) * bs))
            self.hash_to_block[h] = block.block_id
        req.num_registered_blocks = max(req.num_registered_blocks, num_full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents)."""
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self.hash_to_block.clear()
