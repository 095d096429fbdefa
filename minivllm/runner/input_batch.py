"""The persistent batch: one row per running request, kept between steps.

Rows are created when a request is first scheduled (or resumed), dropped when it finishes or is
preempted, and otherwise only patched: new block ids are appended to the row's block table (on
the host mirror and, in place, on the device). A step then needs only vectorised numpy over the
scheduled rows and a single host→device copy (``StagingBuffer``); nothing is rebuilt per row.

Input ids that the host does not know yet (sampled by the step still in flight) are marked
``TOKEN_FROM_DEVICE`` by the scheduler and copied from that step's sampled ids on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minivllm.attention.metadata import AttentionMetadata
from minivllm.engine.scheduler_output import TOKEN_FROM_DEVICE, NewRequestData, SchedulerOutput
from minivllm.runner.sampling_rows import SamplingRows
from minivllm.runner.staging import StagingBuffer


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # int64 [S]: token rows whose hidden state is sampled
    sample_rows: np.ndarray  # int64 [S]: persistent-batch rows that sample, same order
    sample_rows_dev: torch.Tensor  # the same on the device


@dataclass
class PreviousSample:
    """Where the last step's sampled ids are: on the device, one per sampling request."""

    token_ids: torch.Tensor  # int64 [S] (device)
    index_of: dict[str, int]  # request id → index into token_ids


class InputBatch:
    """Rows of the running requests: block tables and sampling settings, host and device."""

    def __init__(self, max_rows: int, max_blocks_per_row: int, block_size: int, vocab_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self.block_table = np.zeros((max_rows, max_blocks_per_row), dtype=np.int32)
        self.block_table_dev = torch.zeros((max_rows, max_blocks_per_row), dtype=torch.int32,
                                           device=device)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.sampling = SamplingRows(max_rows, vocab_size, device)
        self.staging = StagingBuffer(device)
        self._block_updates: list[tuple[int, int, list[int]]] = []  # (row, first col, ids)

    # ---- rows ----------------------------------------------------------------------------
    def add(self, new: NewRequestData) -> None:
        if new.request_id in self.row_of:
            self.remove(new.request_id)
        if not self._free_rows:
            raise RuntimeError("persistent batch is full: more running requests than max_num_seqs")
        row = self._free_rows.pop()
        self.row_of[new.request_id] = row
        self.num_blocks[row] = 0
        self.append_blocks(new.request_id, new.block_ids)
        self.sampling.add(row, new.params, new.seed, new.eos_token_ids, new.prompt_token_ids,
                          new.output_token_ids)

    def remove(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            if self._block_updates:  # never apply a gone request's blocks to a reused row
                self._block_updates = [u for u in self._block_updates if u[0] != row]
            self.sampling.remove(row)
            self._free_rows.append(row)

    def append_blocks(self, request_id: str, block_ids: list[int]) -> None:
        row = self.row_of[request_id]
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.block_table.shape[1]:
            raise RuntimeError(f"request {request_id!r} holds more blocks than max_model_len allows")
        self.block_table[row, start:end] = block_ids
        self.num_blocks[row] = end
        self._block_updates.append((row, start, block_ids))

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, step: SchedulerOutput, prev: PreviousSample | None) -> ModelInputs:
        """Flatten the scheduled rows into model inputs with one host→device copy."""
        bs = self.block_size
        rows = np.fromiter((self.row_of[r] for r in step.req_ids), dtype=np.int64,
                           count=len(step.req_ids))
        num_tokens = np.asarray(step.num_scheduled_tokens, dtype=np.int64)
        starts = np.asarray(step.num_computed_tokens, dtype=np.int64)
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(num_tokens, out=query_start_loc[1:])
        seq_lens = (starts + num_tokens).astype(np.int32)
        total = int(query_start_loc[-1])
        if len(rows) == total:  # pure decode: one token per row
            req_of_token = np.arange(total)
            positions = starts
        else:
            req_of_token = np.repeat(np.arange(len(rows)), num_tokens)
            positions = starts[req_of_token] + (np.arange(total) - query_start_loc[:-1][req_of_token])
        token_rows = rows[req_of_token]
        slot_mapping = (self.block_table[token_rows, positions // bs].astype(np.int64) * bs
                        + positions % bs)
        input_ids = np.asarray(step.token_ids, dtype=np.int64)
        sampling_idx = np.asarray(step.sampling_rows, dtype=np.int64)
        logits_indices = query_start_loc[1:][sampling_idx].astype(np.int64) - 1
        sample_rows = rows[sampling_idx]

        fix_pos = np.nonzero(input_ids == TOKEN_FROM_DEVICE)[0]
        fix_src = np.empty(0, dtype=np.int64)
        if len(fix_pos):
            if prev is None:
                raise RuntimeError("an input token is in flight but no previous step sampled it")
            fix_src = np.fromiter((prev.index_of[step.req_ids[i]] for i in req_of_token[fix_pos]),
                                  dtype=np.int64, count=len(fix_pos))
            input_ids[fix_pos] = 0

        st = self.staging
        st.begin()
        handles = [st.put(a) for a in (input_ids, positions, slot_mapping, logits_indices, rows,
                                        sample_rows, query_start_loc, seq_lens)]
        upd = self._stage_block_updates(st)
        sampling_upd = self.sampling.stage(st)
        fix = (st.put(fix_pos.astype(np.int64)), st.put(fix_src)) if len(fix_pos) else None
        dev = st.upload()
        (input_ids_d, positions_d, slot_mapping_d, logits_indices_d, rows_d, sample_rows_d,
         qsl_d, seq_lens_d) = (dev[h] for h in handles)
        if upd is not None:
            r, c, v = (dev[h] for h in upd)
            self.block_table_dev[r, c] = v
        self.sampling.apply(sampling_upd, dev)
        if fix is not None:
            input_ids_d[dev[fix[0]]] = prev.token_ids[dev[fix[1]]]
        meta = AttentionMetadata(
            slot_mapping=slot_mapping_d,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            # Full width, whatever the step's longest row: a fixed row stride keeps the attention
            # kernels on one compiled variant (Triton specialises on integer arguments).
            block_tables=self.block_table_dev.index_select(0, rows_d),
            max_query_len=int(num_tokens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=torch.from_numpy(query_start_loc),
            seq_lens_cpu=torch.from_numpy(seq_lens),
            num_actual_tokens=total,
        )
        return ModelInputs(input_ids_d, positions_d, meta, logits_indices_d, sample_rows,
                           sample_rows_d)

    def _stage_block_updates(self, st: StagingBuffer) -> tuple[int, int, int] | None:
        """Stage ``(row, col, block id)`` triples of the blocks added since the last step."""
        if not self._block_updates:
            return None
        rows, cols, vals = [], [], []
        for row, start, ids in self._block_updates:
            rows.extend([row] * len(ids))
            cols.extend(range(start, start + len(ids)))
            vals.extend(ids)
        self._block_updates = []
        return (st.put(np.asarray(rows, dtype=np.int64)), st.put(np.asarray(cols, dtype=np.int64)),
                st.put(np.asarray(vals, dtype=np.int32)))
