"""Per-step attention metadata: built once by the model runner, passed explicitly to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes one flattened, possibly mixed (decode + prefill chunk) batch.

    Tokens of all requests are concatenated: request ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``. Its context after this step holds
    ``seq_lens[i]`` tokens, the last ``query_len`` of which are the new ones, so the
    query token ``j`` of request ``i`` sits at absolute position
    ``seq_lens[i] - query_len_i + j`` and attends causally to positions ``<=`` that.

    Attributes:
        slot_mapping: int64 ``[num_tokens]``; flat cache slot (``block * block_size + offset``)
            where each new token's K/V is written. ``-1`` marks padding: never written.
        query_start_loc: int32 ``[num_seqs + 1]``, cumulative query lengths (device).
        seq_lens: int32 ``[num_seqs]``, context length incl. this step's tokens (device).
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; physical block ids, padded
            with 0 beyond each request's blocks (never read there).
        max_query_len: host int, largest query length in the batch (1 for a pure decode step).
        max_seq_len: host int, upper bound on ``seq_lens`` (a static cap under CUDA graphs).
        query_start_loc_cpu / seq_lens_cpu: host copies, so the torch reference path and
            metadata builders never have to sync with the device.
        num_actual_tokens: tokens that are real (rows past this are padding).
        calculate_kv_scales: set by the runner on the first real step of an FP8 cache built
            with ``calculate_kv_scales``: every layer sets its K/V scales from this step's
            ``amax / 448`` before storing (then they stay fixed).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    num_actual_tokens: int
    calculate_kv_scales: bool = False

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens_cpu.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
