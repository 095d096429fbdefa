"""Token sampling on the device, vectorised over the batch.

Order of operations per row: logit bias, penalties and banned tokens on the raw logits → greedy
argmax, or temperature → top-k → top-p → min-p → draw. The bias comes before the penalties as
in vLLM v1 (its logits processors run before them); banned tokens (outside ``allowed_token_ids``,
or EOS/stop ids before ``min_tokens``) are -inf whatever came before. Draws use the
"exponential race" (``argmax(p / E)``, ``E ~ Exp(1)``), which samples exactly from ``p``; each
seeded request draws its noise from its own generator, so its tokens do not depend on the rest
of the batch.
Logprobs are those of the raw model distribution (before penalties and temperature), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitBias:
    """``logits[rows[i], token_ids[i]] += values[i]``: only the biased entries cross to the
    device, never a ``[batch, vocab]`` tensor. A (row, token) pair appears at most once."""

    rows: torch.Tensor  # int64 [K]: index into the step's batch
    token_ids: torch.Tensor  # int64 [K]
    values: torch.Tensor  # float32 [K]


@dataclass
class SamplingMetadata:
    """Per-row sampling settings for one step (rows = requests that sample this step)."""

    # Per-row settings; None when every row is greedy (then they are never read).
    temperature: torch.Tensor | None  # float32 [B]; 0 = greedy
    top_k: torch.Tensor | None  # int64 [B]; 0 = off
    top_p: torch.Tensor | None  # float32 [B]
    min_p: torch.Tensor | None  # float32 [B]
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    generators: list[torch.Generator | None]  # per row; None → the engine-wide generator
    max_num_logprobs: int  # -1: none; 0: only the sampled token's; N: top-N too
    # Penalties (None when no row uses them).
    repetition_penalty: torch.Tensor | None = None  # [B]
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    prompt_mask: torch.Tensor | None = None  # bool [B, V]: token occurs in the prompt
    output_counts: torch.Tensor | None = None  # float32 [B, V]: occurrences in the output
    # bool [B, V] of tokens that must not be sampled now: outside the row's allowed_token_ids,
    # or EOS/stop ids before min_tokens. Never a whole row (the runner keeps one token open).
    banned_mask: torch.Tensor | None = None
    # Sparse additive logit bias (None when no row has one).
    logit_bias: LogitBias | None = None
    # False when no row is greedy: the greedy argmax over the batch is then skipped.
    any_greedy: bool = True


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # int64 [B]
    sampled_logprobs: torch.Tensor | None  # float32 [B]: raw logprob of the sampled token
    topk_logprobs: torch.Tensor | None  # float32 [B, N]
    topk_token_ids: torch.Tensor | None  # int64 [B, N]
    # int64 [B]: the sampled token's 1-based rank among the raw logprobs (1 = most likely).
    sampled_ranks: torch.Tensor | None = None


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens)."""
    if md.repetition_penalty is not None:
        seen = md.prompt_mask | (md.output_counts > 0)
        rep = md.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if md.frequency_penalty is not None:
        logits = logits - md.frequency_penalty[:, None] * md.output_counts
        logits = logits - md.presence_penalty[:, None] * (md.output_counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude. ``logits`` are temperature-scaled."""
    if md.any_top_k or md.any_top_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if md.any_top_k:
            vocab = logits.shape[-1]
            k = torch.where(md.top_k > 0, md.top_k, vocab).clamp(max=vocab)
            ranks = torch.arange(vocab, device=logits.device)[None, :]
            remove |= ranks >= k[:, None]
        if md.any_top_p:
            probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            # Rows with top_p == 1 are exempt: float32 cumsums can reach 1 before the tail ends.
            remove |= (mass_before >= md.top_p[:, None]) & (md.top_p[:, None] < 1)
        logits = logits.scatter(-1, sorted_idx, sorted_logits.masked_fill(remove, float("-inf")))
    if md.any_min_p:
        probs = logits.softmax(dim=-1)
        threshold = md.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None],
                      default: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``Exp(1)`` noise; rows with their own generator draw only from it."""
    noise = torch.empty(shape, device=device)
    if all(g is None for g in generators):
        return noise.exponential_(generator=default)
    for row, gen in enumerate(generators):
        noise[row].exponential_(generator=gen if gen is not None else default)
    return noise


class Sampler:
    """Turns float32 logits ``[B, V]`` into token ids (+ logprobs)."""

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = logits.log_softmax(dim=-1) if md.max_num_logprobs >= 0 else None
        if md.logit_bias is not None:
            b = md.logit_bias
            # Out of place: ``logits`` is the caller's tensor.
            logits = logits.index_put((b.rows, b.token_ids), b.values, accumulate=True)
        logits = apply_penalties(logits, md)
        if md.banned_mask is not None:
            logits = logits.masked_fill(md.banned_mask, float("-inf"))
        if md.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            is_greedy = md.temperature == 0
            temp = torch.where(is_greedy, torch.ones_like(md.temperature), md.temperature)
            scaled = filter_logits(logits / temp[:, None], md)
            # Unnormalised probabilities: dividing by the row's sum would not move the argmax
            # below, and skipping it saves two passes over [batch, vocab]. ``scaled`` is a fresh
            # tensor (never ``logits``), so it is reused in place.
            weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
            noise = exponential_noise(tuple(weights.shape), md.generators, self.default_generator,
                                      weights.device)
            drawn = weights.div_(noise).argmax(dim=-1)
            sampled = torch.where(is_greedy, logits.argmax(dim=-1), drawn) if md.any_greedy else drawn
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        sampled_lp = raw_logprobs.gather(-1, sampled[:, None]).squeeze(-1)
        # Tokens at least as likely as the sampled one, itself included (vLLM's rank).
        sampled_rank = (raw_logprobs >= sampled_lp[:, None]).sum(dim=-1)
        if md.max_num_logprobs > 0:
            top_lp, top_ids = raw_logprobs.topk(md.max_num_logprobs, dim=-1)
        else:
            top_lp = top_ids = None
        return SamplerOutput(sampled, sampled_lp, top_lp, top_ids, sampled_rank)
