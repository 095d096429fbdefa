"""Frontend side of pooling requests, shared by ``LLM`` and ``AsyncLLM``: check the task,
resolve parameters, truncate or reject long prompts, build engine requests and outputs."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minivllm.config import EngineConfig
from minivllm.engine.input_processor import (InputProcessor, ProcessedPrompt, PromptType,
                                             as_prompt_list)
from minivllm.engine.messages import EngineCoreOutput
from minivllm.engine.request import Request
from minivllm.engine.scheduler import check_prompt_fits
from minivllm.pooling.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_NO_SAMPLING = SamplingParams()  # pooling requests sample nothing; the row needs some settings


def default_pooling_type(model_dir: Path) -> str:
    """The pooling a sentence-transformers package declares (``modules.json`` → its Pooling
    module's ``config.json``): ``mean`` or ``last``; ``last`` when there is none (HF
    classifiers, Qwen3-Embedding)."""
    modules = Path(model_dir) / "modules.json"
    if not modules.is_file():
        return "last"
    try:
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).endswith("Pooling"):
                cfg = json.loads((Path(model_dir) / module["path"] / "config.json").read_text())
                if cfg.get("pooling_mode_mean_tokens"):
                    return "mean"
                if not cfg.get("pooling_mode_lasttoken"):
                    logger.warning("pooling mode of %s is not supported; using last-token pooling", model_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("cannot read the sentence-transformers pooling config of %s (%s); "
                       "using last-token pooling", model_dir, e)
    return "last"




class PoolingFrontend:
    """Turns user prompts into pooling ``Request``s and engine outputs into results."""

    def __init__(self, config: EngineConfig, input_processor: InputProcessor, max_model_len: int) -> None:
        self.task = config.task
        self.labels = config.arch.id2label
        self.input_processor = input_processor
        self.max_model_len = max_model_len
        self.default_pooling_type = default_pooling_type(config.model_dir)

    def check_task(self, task: str) -> None:
        """Raise ValueError unless the engine runs ``task`` (``score`` runs on ``embed``)."""
        needed = "embed" if task == "score" else task
        if self.task != needed:
            hint = " (pass task='embed' to embed with this model)" if needed == "embed" else ""
            raise ValueError(f"{task}() needs a model served with task {needed!r}; this engine runs "
                             f"task {self.task!r}{hint}")

    def params_list(self, params: PoolingParams | Sequence[PoolingParams] | None, n: int) -> list[PoolingParams]:
        """One resolved ``PoolingParams`` per prompt (``pooling_type`` filled in)."""
        if params is None or isinstance(params, PoolingParams):
            params = [params or PoolingParams()] * n
        elif not isinstance(params, (list, tuple)) or len(params) != n:
            raise ValueError(f"pooling_params must be PoolingParams or a list of {n} of them")
        out = []
        for p in params:
            if not isinstance(p, PoolingParams):
                raise ValueError(f"pooling_params entries must be PoolingParams, got {type(p).__name__}")
            if p.pooling_type is None:
                p = PoolingParams(self.default_pooling_type, p.normalize, p.activation, p.truncate_prompt_tokens)
            out.append(p)
        return out

    def process(self, prompt: PromptType, params: PoolingParams) -> ProcessedPrompt:
        """Tokenize, truncate (keep the last ``truncate_prompt_tokens``) and check the length.

        Raises:
            ValueError: a bad prompt, or one longer than ``max_model_len`` without truncation.
        """
        processed = self.input_processor.process_prompt(prompt)
        keep = params.truncate_prompt_tokens
        if keep == -1:
            keep = self.max_model_len
        if keep is not None and len(processed.prompt_token_ids) > keep:
            processed = ProcessedPrompt(processed.prompt, processed.prompt_token_ids[-keep:])
        check_prompt_fits(len(processed.prompt_token_ids), self.max_model_len, pooling=True)
        return processed

    @staticmethod
    def make_request(rid: str, processed: ProcessedPrompt, params: PoolingParams, now: float) -> Request:
        return Request(request_id=rid, prompt_token_ids=list(processed.prompt_token_ids),
                       params=_NO_SAMPLING, arrival_time=now, pooling_params=params)

    @staticmethod
    def to_wire(req: Request) -> dict[str, Any]:
        """The ``add`` message entry of a pooling request for the engine-core process."""
        from minivllm.engine.serialization import params_to_wire

        return {"request_id": req.request_id, "prompt_token_ids": req.prompt_token_ids,
                "params": params_to_wire(req.params), "arrival_time": req.arrival_time,
                "eos_token_ids": [], "seed": None, "pooling_params": req.pooling_params.to_wire()}

    def make_output(self, task: str, rid: str, processed: ProcessedPrompt,
                    out: EngineCoreOutput) -> PoolingRequestOutput:
        """The user's result for one finished pooling request (``task``: classify / embed)."""
        values = [float(v) for v in out.pooled]
        if task == "classify":
            best = max(range(len(values)), key=values.__getitem__)
            result: Any = ClassificationOutput(values, self.labels[best], self.labels)
            cls: type[PoolingRequestOutput] = ClassificationRequestOutput
        else:
            result, cls = EmbeddingOutput(values), EmbeddingRequestOutput
        return cls(rid, processed.prompt, list(processed.prompt_token_ids), result,
                   num_cached_tokens=out.num_cached_tokens)


def score_pairs(text_1: Any, text_2: Any) -> tuple[list[PromptType], list[tuple[int, int]]]:
    """vLLM's pairing rule: one ``text_1`` against each ``text_2``, or two lists of equal
    length pairwise. Returns the prompts to embed and the index pairs to compare."""
    first, second = as_prompt_list(text_1), as_prompt_list(text_2)
    if len(first) == 1:  # embedded once, compared with each
        return first + second, [(0, 1 + i) for i in range(len(second))]
    if len(first) != len(second):
        raise ValueError(f"score needs one text_1 or as many as text_2 ({len(first)} vs {len(second)})")
    return first + second, [(i, len(first) + i) for i in range(len(first))]


def make_scores(rid_prefix: str, embeds: list[PoolingRequestOutput],
                pairs: list[tuple[int, int]]) -> list[ScoringRequestOutput]:
    """Cosine similarity of each pair of embeddings."""
    out = []
    for k, (i, j) in enumerate(pairs):
        a, b = embeds[i].outputs.embedding, embeds[j].outputs.embedding
        dot = sum(x * y for x, y in zip(a, b))
        norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        out.append(ScoringRequestOutput(f"{rid_prefix}{k}", None,
                                        embeds[i].prompt_token_ids + embeds[j].prompt_token_ids,
                                        ScoringOutput(dot / norm if norm else 0.0)))
    return out
