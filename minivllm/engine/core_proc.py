"""The engine core in its own process: a busy loop behind two ZMQ sockets.

Input (PULL): ``add`` (a list of requests), ``abort`` (ids), ``stats``, ``shutdown``.
Output (PUSH): ``ready`` (cache facts), ``outputs`` (one step), ``error`` (one request failed
to be added: only that request), ``stats``, ``dead`` (the loop itself failed).
The loop blocks on its input only when it has no work; otherwise it drains what arrived and
runs the next step, so new requests join the running batch at the next step.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback

import zmq

from minivllm.config import EngineConfig
from minivllm.engine.core import EngineCore
from minivllm.engine.request import Request
from minivllm.engine.serialization import outputs_to_wire, pack, params_from_wire, unpack


_PARENT_CHECK_S = 1.0


def _add_requests(core: EngineCore, wire_requests: list[dict], push: zmq.Socket) -> None:
    for r in wire_requests:
        try:
            req = Request(request_id=r["request_id"], prompt_token_ids=r["prompt_token_ids"],
                          params=params_from_wire(r["params"]), arrival_time=r["arrival_time"],
                          eos_token_ids=frozenset(r["eos_token_ids"]), seed=r["seed"])
            core.add_request(req)
        except ValueError as e:  # this request only; the engine goes on
            push.send(pack("error", {"request_id": r["request_id"], "message": str(e)}))


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point. Never raises: failures are reported as ``dead``."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(input_addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(output_addr)
    try:
        core = EngineCore(config)
        push.send(pack("ready", {"num_kv_blocks": core.cache_config.num_kv_blocks,
                                 "max_model_len": core.scheduler_config.max_model_len}))
        parent = multiprocessing.parent_process()
        last_parent_check = time.monotonic()
        while True:
            # Idle: wait for input, but wake up now and then to see whether the frontend
            # still exists; a core whose parent was killed must not linger.
            timeout = 0 if core.has_unfinished else _PARENT_CHECK_S * 1000
            if time.monotonic() - last_parent_check > _PARENT_CHECK_S:
                last_parent_check = time.monotonic()
                if parent is not None and not parent.is_alive():
                    return
            while pull.poll(timeout):
                kind, payload = unpack(pull.recv())
                if kind == "shutdown":
                    return
                if kind == "add":
                    _add_requests(core, payload, push)
                elif kind == "abort":
                    core.abort_requests(payload)
                elif kind == "stats":
                    push.send(pack("stats", core.stats()))
                timeout = 0
            if core.has_unfinished:
                outs = core.step()
                if outs.outputs:
                    push.send(pack("outputs", outputs_to_wire(outs)))
    except Exception:
        push.send(pack("dead", traceback.format_exc()))
    finally:
        push.close(linger=1000)
        pull.close(linger=0)
        ctx.term()
