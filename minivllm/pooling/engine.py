"""The engine core's side of pooling requests: which tasks take them, and finishing them."""

from __future__ import annotations

from minivllm.engine.messages import EngineCoreOutput, EngineCoreOutputs
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.scheduler_output import ModelRunnerOutput


def check_task(task: str, is_pooling: bool) -> None:
    """Raise ValueError when a request does not fit the engine's task: a generative model
    cannot pool, a classifier or embedding model cannot generate."""
    if is_pooling and task == "generate":
        raise ValueError("this model generates text (task 'generate'); classify/embed need a "
                         "classification or embedding model (or task='embed')")
    if not is_pooling and task != "generate":
        raise ValueError(f"this engine runs task {task!r}: it cannot generate text; use "
                         f"{'classify()' if task == 'classify' else 'embed()'}")


def finish_pooled(scheduler: Scheduler, output: ModelRunnerOutput, result: EngineCoreOutputs) -> None:
    """Emit each pooled request's result and finish it (its KV blocks go back to the pool;
    full blocks stay hittable by the prefix cache). Requests aborted meanwhile are skipped."""
    for rid, values in zip(output.pooled_req_ids, output.pooled):
        req = scheduler.requests.get(rid)
        if req is None or req.is_finished:
            continue
        result.outputs.append(EngineCoreOutput(
            request_id=rid, new_token_ids=[], finish_reason="stop",
            num_cached_tokens=req.num_cached_tokens, pooled=values))
        scheduler.finish(req, "stop")
