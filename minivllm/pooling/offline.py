"""``LLM.classify / embed / score``: run pooling requests on the in-process engine core."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from minivllm.engine.input_processor import as_prompt_list
from minivllm.pooling.frontend import (
    PoolingFrontend,
    make_scores,
    score_pairs,
)
from minivllm.pooling.outputs import PoolingRequestOutput, ScoringRequestOutput
from minivllm.pooling_params import PoolingParams

if TYPE_CHECKING:
    from minivllm.llm import LLM


class PoolingRequestError(RuntimeError):
    """The engine failed a pooling request (a model step that raised for the requests in it)."""


def run_pooling(llm: LLM, task: str, prompts: Any,
                pooling_params: PoolingParams | Sequence[PoolingParams] | None,
                use_tqdm: bool) -> list[PoolingRequestOutput]:
    """Pool every prompt in one packed, prefill-only run; outputs in input order.

    Raises:
        ValueError: a bad prompt or parameter, or the wrong task (nothing is run).
        PoolingRequestError: the engine failed a request (the engine stays usable).
    """
    from minivllm.llm import _ProgressBar

    fe = PoolingFrontend(llm.config, llm.input_processor, llm.engine.scheduler_config.max_model_len)
    fe.check_task(task)
    prompt_list = as_prompt_list(prompts)
    params = fe.params_list(pooling_params, len(prompt_list))
    processed = [fe.process(p, sp) for p, sp in zip(prompt_list, params)]
    for p in processed:  # everything is checked before anything is queued
        llm.engine.check_request(len(p.prompt_token_ids), pooling=True)
    now, tag = time.time(), uuid.uuid4().hex[:8]
    order = {f"pool-{tag}-{i}": i for i in range(len(processed))}
    results: list[PoolingRequestOutput | None] = [None] * len(processed)
    bar = _ProgressBar(len(processed), use_tqdm)
    error = None
    try:
        for rid, i in order.items():
            llm.engine.add_request(PoolingFrontend.make_request(rid, processed[i], params[i], now))
        while llm.engine.has_unfinished:
            step = llm.engine.step()
            done = 0
            for out in step.outputs:
                i = order.get(out.request_id)
                if i is None:
                    continue
                if out.pooled is None:  # failed in the engine
                    error = error or out.error or "the request failed in the engine"
                else:
                    results[i] = fe.make_output(task, out.request_id, processed[i], out)
                done += 1
            bar.update(done, step.num_prefill_tokens, 0)
    except BaseException:
        llm.engine.abort_requests(list(llm.engine.requests))  # leave the engine clean
        raise
    finally:
        bar.close()
    if error is not None:
        raise PoolingRequestError(error)
    return results  # type: ignore[return-value]


def run_score(llm: LLM, text_1: Any, text_2: Any, pooling_params: PoolingParams | None,
              use_tqdm: bool) -> list[ScoringRequestOutput]:
    """Cosine similarity of embeddings: ``text_1`` against each ``text_2``, or pairwise."""
    prompts, pairs = score_pairs(text_1, text_2)
    embeds = run_pooling(llm, "score", prompts, pooling_params, use_tqdm)
    return make_scores("score-", embeds, pairs)
