"""Per-row sampling settings of the persistent batch, and the per-step ``SamplingMetadata``.

A row's settings are written once, when its request joins the batch: host mirrors (numpy, for
the per-step "does any row need top-k?" decisions) and device columns (gathered per step by
row index, so nothing ``[batch, vocab]``-sized is ever built on the host). Penalty state lives
on the device too: a prompt-occurrence mask and output-token counts per row, updated in place
from each step's sampled ids, so a token still in flight (overlapped scheduling) is counted.
``logit_bias`` and ``allowed_token_ids`` are sparse: per-row device tensors of ids (and bias
values) made when the row is added, concatenated for a step only when the rows that use them
change; a step in which no row uses them does none of this work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minivllm.layers.sampler import LogitBias, SamplingMetadata
from minivllm.runner.staging import StagingBuffer, to_device
from minivllm.sampling_params import SamplingParams


class SamplingRows:
    """Sampling settings, seeded generators and penalty state of up to ``max_rows`` rows."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.temperature = np.zeros(max_rows, np.float32)
        self.top_k = np.zeros(max_rows, np.int64)
        self.top_p = np.ones(max_rows, np.float32)
        self.min_p = np.zeros(max_rows, np.float32)
        self.num_logprobs = np.full(max_rows, -1, np.int64)
        self.uses_penalties = np.zeros(max_rows, bool)
        self.min_tokens = np.zeros(max_rows, np.int64)
        # Output tokens sampled so far (or in flight): when min_tokens bans apply.
        self.num_output = np.zeros(max_rows, np.int64)
        self.banned_ids: list[list[int]] = [[] for _ in range(max_rows)]
        self.generators: list[torch.Generator | None] = [None] * max_rows
        self.params: list[SamplingParams | None] = [None] * max_rows
        # Device columns, filled from the host mirrors for rows added this step.
        self._cols = {name: torch.zeros(max_rows, dtype=dtype, device=device) for name, dtype in
                      (("temperature", torch.float32), ("top_k", torch.int64),
                       ("top_p", torch.float32), ("min_p", torch.float32))}
        self.penalty: _PenaltyState | None = None
        self._dirty_rows: list[int] = []
        # logit_bias / allowed_token_ids: per row (None: the row uses neither), and how many
        # rows use them, so that steps without any skip them at the cost of one int test.
        self.token_rules: list[_RowTokenRules | None] = [None] * max_rows
        self.has_token_rules = np.zeros(max_rows, bool)
        self._num_rule_rows = 0
        self._rules_version = 0  # bumped whenever a row's rules change: invalidates the cache
        self._step_rules_cache: tuple[tuple, _StepTokenRules] | None = None

    # ---- rows ----------------------------------------------------------------------------
    def add(self, row: int, params: SamplingParams, seed: int | None, eos_token_ids: tuple[int, ...],
            prompt_token_ids: list[int], output_token_ids: list[int]) -> None:
        """Write a new row's settings (device columns follow with the next ``stage``)."""
        # Values beyond the vocabulary behave like "off" and must not overflow a tensor.
        self.temperature[row] = params.temperature
        self.top_k[row] = min(params.top_k, self.vocab_size)
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.num_logprobs[row] = -1 if params.logprobs is None else params.logprobs
        self.min_tokens[row] = min(params.min_tokens, np.iinfo(np.int64).max)
        self.num_output[row] = len(output_token_ids)
        self.params[row] = params
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= set(eos_token_ids)
        self.banned_ids[row] = sorted(i for i in banned if 0 <= i < self.vocab_size)
        rules = _RowTokenRules.make(params, self.vocab_size, self.device)
        if (rules is not None and rules.allowed is not None and params.min_tokens > 0
                and set(rules.allowed) <= set(self.banned_ids[row])):
            # min_tokens would ban every allowed token: the row would have nothing to sample
            # (NaN weights, an arbitrary token). ``SamplingParams.check_token_ids`` refuses such
            # requests; should one get here anyway, the explicit allowed set wins.
            self.banned_ids[row] = []
        self._set_token_rules(row, rules)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed % (1 << 64))
        self.generators[row] = gen
        uses = (params.repetition_penalty != 1 or params.presence_penalty != 0
                or params.frequency_penalty != 0)
        self.uses_penalties[row] = uses
        if uses and self.penalty is None:
            self.penalty = _PenaltyState(len(self.temperature), self.vocab_size, self.device)
        if uses:
            self.penalty.reset_row(row, params, prompt_token_ids, output_token_ids)
        elif self.penalty is not None:
            self.penalty.neutral_row(row)  # a reused row must not keep an old request's values
        self._dirty_rows.append(row)

    def remove(self, row: int) -> None:
        self.generators[row] = None
        self.params[row] = None
        self.uses_penalties[row] = False
        self._set_token_rules(row, None)

    def _set_token_rules(self, row: int, rules: _RowTokenRules | None) -> None:
        if self.token_rules[row] is None and rules is None:
            return  # the common case: nothing to count, and the cache stays valid
        self._num_rule_rows += int(rules is not None) - int(self.has_token_rules[row])
        self.token_rules[row] = rules
        self.has_token_rules[row] = rules is not None
        self._rules_version += 1
        if not self._num_rule_rows:
            self._step_rules_cache = None  # frees its [batch, vocab] mask

    def stage(self, staging: StagingBuffer) -> tuple[int, ...] | None:
        """Stage the settings of rows added since the last step (see ``apply``)."""
        if not self._dirty_rows:
            return None
        rows = np.asarray(self._dirty_rows, dtype=np.int64)
        self._dirty_rows = []
        return (staging.put(rows),) + tuple(staging.put(getattr(self, name)[rows])
                                            for name in self._cols)

    def apply(self, handles: tuple[int, ...] | None, uploaded: list[torch.Tensor]) -> None:
        """Write the staged settings into the device columns."""
        if handles is None:
            return
        rows = uploaded[handles[0]]
        for h, col in zip(handles[1:], self._cols.values()):
            col.index_copy_(0, rows, uploaded[h])

    # ---- one step ------------------------------------------------------------------------
    def metadata(self, rows: np.ndarray, rows_dev: torch.Tensor) -> SamplingMetadata:
        """``SamplingMetadata`` for the sampling rows ``rows`` (host) / ``rows_dev`` (device)."""
        temp = self.temperature[rows]
        sampling = temp > 0
        all_greedy = not sampling.any()
        cols = None if all_greedy else {n: c.index_select(0, rows_dev) for n, c in self._cols.items()}
        md = SamplingMetadata(
            temperature=None if all_greedy else cols["temperature"],
            top_k=None if all_greedy else cols["top_k"],
            top_p=None if all_greedy else cols["top_p"],
            min_p=None if all_greedy else cols["min_p"],
            all_greedy=bool(all_greedy),
            any_top_k=bool((self.top_k[rows][sampling] > 0).any()),
            any_top_p=bool((self.top_p[rows][sampling] < 1).any()),
            any_min_p=bool((self.min_p[rows][sampling] > 0).any()),
            generators=[self.generators[r] for r in rows.tolist()],
            max_num_logprobs=int(self.num_logprobs[rows].max(initial=-1)),
            any_greedy=bool((~sampling).any()),
        )
        if self.penalty is not None and self.uses_penalties[rows].any():
            self.penalty.fill(md, rows_dev)
        mask = None
        if self._num_rule_rows:
            step_rules = self._step_rules(rows)
            if step_rules is not None:
                md.logit_bias = step_rules.bias
                mask = step_rules.disallowed
        under_min = np.nonzero(self.num_output[rows] < self.min_tokens[rows])[0]
        if len(under_min):
            # Only the (row, token) pairs cross to the device; the mask is built there.
            pairs = [(i, t) for i in under_min.tolist() for t in self.banned_ids[rows[i]]]
            if mask is None:
                mask = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=self.device)
            elif pairs:
                mask = mask.clone()  # the allowed-token mask is cached for later steps
            if pairs:
                idx = to_device(pairs, torch.int64, self.device)
                mask[idx[:, 0], idx[:, 1]] = True
        md.banned_mask = mask
        return md

    def _step_rules(self, rows: np.ndarray) -> _StepTokenRules | None:
        """The bias and allowed-token mask of the rows ``rows`` (None if none of them has
        rules). Reused while the batch's rows with rules, their order and their rules stay the
        same: a decode batch changes far less often than once per step."""
        pos = np.flatnonzero(self.has_token_rules[rows])
        if not len(pos):
            return None
        key = (self._rules_version, len(rows), pos.tobytes(), rows[pos].tobytes())
        if self._step_rules_cache is not None and self._step_rules_cache[0] == key:
            return self._step_rules_cache[1]
        step = _StepTokenRules.make([(int(i), self.token_rules[rows[i]]) for i in pos], len(rows),
                                    self.vocab_size, self.device)
        self._step_rules_cache = (key, step)
        return step

    def record_sampled(self, rows: np.ndarray, rows_dev: torch.Tensor,
                       sampled_ids: torch.Tensor) -> None:
        """Count each row's new token (host count; device penalty counts, no sync)."""
        self.num_output[rows] += 1
        if self.penalty is not None:
            self.penalty.count(rows_dev, sampled_ids)


class _PenaltyState:
    """Device-resident ``[rows, vocab]`` prompt mask and output counts, made on first use."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.prompt_mask = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(max_rows, vocab_size, dtype=torch.float32, device=device)
        self.repetition = torch.ones(max_rows, dtype=torch.float32, device=device)
        self.presence = torch.zeros(max_rows, dtype=torch.float32, device=device)
        self.frequency = torch.zeros(max_rows, dtype=torch.float32, device=device)

    def reset_row(self, row: int, params: SamplingParams, prompt_ids: list[int],
                  output_ids: list[int]) -> None:
        dev = self.prompt_mask.device
        self.prompt_mask[row].zero_()
        self.prompt_mask[row, to_device(prompt_ids, torch.int64, dev)] = True
        self.output_counts[row].zero_()
        if output_ids:
            ids = to_device(output_ids, torch.int64, dev)
            self.output_counts[row].index_add_(0, ids, torch.ones(len(output_ids), device=dev))
        self.repetition[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty

    def neutral_row(self, row: int) -> None:
        self.repetition[row] = 1.0
        self.presence[row] = 0.0
        self.frequency[row] = 0.0

    def fill(self, md: SamplingMetadata, rows_dev: torch.Tensor) -> None:
        md.prompt_mask = self.prompt_mask.index_select(0, rows_dev)
        md.output_counts = self.output_counts.index_select(0, rows_dev)
        md.repetition_penalty = self.repetition.index_select(0, rows_dev)
        md.presence_penalty = self.presence.index_select(0, rows_dev)
        md.frequency_penalty = self.frequency.index_select(0, rows_dev)

    def count(self, rows_dev: torch.Tensor, sampled_ids: torch.Tensor) -> None:
        ones = torch.ones(sampled_ids.shape[0], dtype=torch.float32, device=sampled_ids.device)
        self.output_counts.index_put_((rows_dev, sampled_ids), ones, accumulate=True)


@dataclass
class _RowTokenRules:
    """One row's ``logit_bias`` / ``allowed_token_ids``: host lists and device tensors, made
    once when the row is added."""

    bias_ids: torch.Tensor | None  # int64 [K] (device)
    bias_values: torch.Tensor | None  # float32 [K] (device)
    allowed: list[int] | None  # sorted, unique
    allowed_ids: torch.Tensor | None  # int64 [M] (device), the same ids

    @staticmethod
    def make(params: SamplingParams, vocab_size: int, device: torch.device) -> _RowTokenRules | None:
        # Ids were checked against the vocabulary by the frontend and the core; ones beyond it
        # (a caller that skipped both) are dropped rather than failing the step's indexing.
        bias = {t: b for t, b in (params.logit_bias or {}).items() if 0 <= t < vocab_size and b != 0}
        allowed = (sorted({t for t in params.allowed_token_ids if 0 <= t < vocab_size})
                   if params.allowed_token_ids else None)
        if not bias and not allowed:
            return None
        bias_ids = bias_values = allowed_ids = None
        if bias:
            bias_ids = to_device(list(bias), torch.int64, device)
            bias_values = to_device(list(bias.values()), torch.float32, device)
        if allowed:
            allowed_ids = to_device(allowed, torch.int64, device)
        return _RowTokenRules(bias_ids, bias_values, allowed or None, allowed_ids)


@dataclass
class _StepTokenRules:
    """The rules of one batch layout: a sparse bias and the mask of tokens outside the
    allowed sets (rows without an allowed set are all False)."""

    bias: LogitBias | None
    disallowed: torch.Tensor | None  # bool [B, V]

    @staticmethod
    def make(rows: list[tuple[int, _RowTokenRules]], batch: int, vocab_size: int,
             device: torch.device) -> _StepTokenRules:
        """``rows``: (index in the batch, that row's rules)."""
        def flat_rows(parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
            counts = [len(ids) for _, ids in parts]
            idx = np.repeat(np.asarray([i for i, _ in parts], dtype=np.int64), counts)
            return to_device(idx, torch.int64, device)

        biased = [(i, r) for i, r in rows if r.bias_ids is not None]
        bias = None
        if biased:
            bias = LogitBias(rows=flat_rows([(i, r.bias_ids) for i, r in biased]),
                             token_ids=torch.cat([r.bias_ids for _, r in biased]),
                             values=torch.cat([r.bias_values for _, r in biased]))
        restricted = [(i, r.allowed_ids) for i, r in rows if r.allowed_ids is not None]
        disallowed = None
        if restricted:
            disallowed = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
            which = to_device([i for i, _ in restricted], torch.int64, device)
            disallowed[which] = True
            disallowed[flat_rows(restricted), torch.cat([ids for _, ids in restricted])] = False
        return _StepTokenRules(bias, disallowed)
