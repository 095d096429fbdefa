"""Offline inference facade: ``LLM(...).generate(prompts, params)`` and ``.chat(messages)``."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from minivllm.engine.core import EngineCore
from minivllm.engine.frontend import build_frontend
from minivllm.engine.input_processor import ProcessedPrompt, PromptType, as_prompt_list
from minivllm.engine_args import EngineArgs
from minivllm.outputs import RequestOutput
from minivllm.pooling.engine import check_task
from minivllm.pooling.offline import run_pooling, run_score
from minivllm.pooling.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput,
                                      ScoringRequestOutput)
from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import render_chat

logger = logging.getLogger(__name__)


class LLM:
    """An engine for offline batch inference.

    ``model=None`` runs the embedded SmolLM2-135M-Instruct. ``model`` may also be an HF
    directory, a ``.gguf`` file, a hub repo id (``"Qwen/Qwen3-0.6B"``, through the HF cache),
    or a directory with a ``config.json`` and ``load_format="dummy"`` for seeded random weights.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """``kwargs`` are the fields of :class:`~minivllm.engine_args.EngineArgs` (``dtype``,
        ``max_model_len``, ``max_num_seqs``, ``tensor_parallel_size``, ``tokenizer``,
        ``revision``, ...); an unknown name raises ``TypeError`` naming it, a bad value
        ``ValueError``."""
        self.config = EngineArgs.from_kwargs(model, kwargs, "LLM").create_engine_config()
        frontend = build_frontend(self.config)
        self.tokenizer = frontend.tokenizer
        self.eos_token_ids = frontend.eos_token_ids
        self.input_processor = frontend.input_processor
        self.output_processor = frontend.output_processor
        self.engine = EngineCore(self.config)
        self._ids = itertools.count()

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for one prompt or a list; outputs are in input order.

        A request that fails inside the engine (a model step that raised for the requests in
        it) comes back finished with ``finish_reason="error"`` and ``RequestOutput.error``; the
        others are unaffected.

        Raises:
            ValueError: a bad prompt or parameter list; nothing is run and the engine stays usable.
        """
        prompt_list = as_prompt_list(prompts)
        processed = [self.input_processor.process_prompt(p) for p in prompt_list]
        return self._run(processed, self._params_list(sampling_params, len(processed)), use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Generate replies to one OpenAI-style conversation or a list of them.

        ``chat_template`` replaces the tokenizer's template; ``chat_template_kwargs`` are extra
        template variables; ``continue_final_message=True`` (with ``add_generation_prompt=False``)
        makes the model continue the last, assistant, message instead of starting a new one.
        """
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        conversations = messages if isinstance(messages[0], list) else [messages]
        processed = []
        for conv in conversations:
            text = render_chat(self.tokenizer, conv, chat_template=chat_template,
                               chat_template_kwargs=chat_template_kwargs,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            processed.append(ProcessedPrompt(text, ids))
        return self._run(processed, self._params_list(sampling_params, len(processed)), use_tqdm)

    def stats(self) -> dict:
        """Engine counters: preemptions, prefix-cache queries/hits (tokens), KV cache size/usage."""
        return self.engine.stats()

    def get_tokenizer(self):
        return self.tokenizer

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _params_list(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if isinstance(params, (list, tuple)):
            if len(params) != n:
                raise ValueError(f"got {len(params)} sampling params for {n} prompts; "
                                 "pass one SamplingParams or a list of the same length")
            for p in params:
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"sampling_params entries must be SamplingParams, got {type(p).__name__}")
            return list(params)
        raise ValueError(f"sampling_params must be SamplingParams or a list of them, got {type(params).__name__}")

    def _run(self, prompts: list[ProcessedPrompt], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        # Validate everything before queueing anything, so a bad prompt leaves no residue.
        check_task(self.config.task, is_pooling=False)
        for p in prompts:
            self.engine.check_request(len(p.prompt_token_ids))
        for sp in {id(sp): sp for sp in params}.values():  # one shared object is checked once
            self.input_processor.check_params(sp)
        order: dict[str, int] = {}
        now = time.time()
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            rid = str(next(self._ids))
            order[rid] = i
            self.output_processor.add_request(rid, prompt, sp, now)
            for req in self.input_processor.make_requests(rid, prompt, sp, now):
                self.engine.add_request(req)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _ProgressBar(len(prompts), use_tqdm)
        try:
            while self.engine.has_unfinished:
                step = self.engine.step()
                for o in step.outputs:
                    if o.error is not None:  # that request ends with finish_reason "error"
                        logger.warning("request %s failed: %s", o.request_id, o.error)
                finished, to_abort = self.output_processor.process(step.outputs)
                self.engine.abort_requests(to_abort, reason="stop")
                bar.update(len(finished), step.num_prefill_tokens, step.num_decode_tokens)
                for out in finished:
                    results[order[out.request_id]] = out
        except BaseException:
            # Leave the engine clean for the next call, whatever went wrong.
            for rid in order:
                self.output_processor.abort(rid)
            self.engine.abort_requests(list(self.engine.requests))
            raise
        finally:
            bar.close()
        return [r for r in results if r is not None]

    # ---- pooling models: classify / embed / score (see minivllm/pooling/) -----------------
    def classify(self, prompts: PromptType | Sequence[PromptType],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """Class probabilities of each prompt (``out.outputs.probs``, ``.label``) from a
        ``*ForSequenceClassification`` model; in input order.

        Raises:
            ValueError: bad prompts or parameters, a prompt over ``max_model_len`` without
                ``truncate_prompt_tokens``, or a model that is not a classifier.
        """
        return run_pooling(self, "classify", prompts, pooling_params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """Embedding of each prompt (``out.outputs.embedding``, L2-normalised by default) from
        an embedding model (task ``embed``); in input order. Raises as ``classify``."""
        return run_pooling(self, "embed", prompts, pooling_params, use_tqdm)

    def score(self, text_1: PromptType | Sequence[PromptType], text_2: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[ScoringRequestOutput]:
        """Cosine similarity of embeddings (``out.outputs.score``): one ``text_1`` against each
        ``text_2``, or two equally long lists pairwise. Raises as ``embed``."""
        return run_score(self, text_1, text_2, pooling_params, use_tqdm)




class _ProgressBar:
    """tqdm bar of finished requests with prefill/decode throughput in the postfix."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.prefill = 0
        self.decode = 0

    def update(self, done: int, prefill_tokens: int, decode_tokens: int) -> None:
        if self.bar is None:
            return
        self.prefill += prefill_tokens
        self.decode += decode_tokens
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"prefill {self.prefill / dt:.0f} tok/s, decode {self.decode / dt:.0f} tok/s",
                                 refresh=False)
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
