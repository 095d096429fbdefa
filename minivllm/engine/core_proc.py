"""The engine core in its own process: a busy loop behind two ZMQ sockets.

Input (PULL): ``add`` (a list of requests), ``abort`` (ids), ``stats``, ``shutdown``.
Output (PUSH): ``ready`` (cache facts), ``outputs`` (one step), ``error`` (one request could
not be added: only that request), ``stats``, ``heartbeat`` (nothing else was sent for
``HEARTBEAT_INTERVAL_S``), ``dead`` (the loop itself failed; the process then exits with 1).

The loop blocks on its input only when it has no work; otherwise it drains what arrived and
runs the next step, so new requests join the running batch at the next step. Heartbeats go
out between steps, never from another thread: a step that runs (or hangs) longer than the
frontend's bound is exactly what the frontend must notice.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import time
import traceback
from typing import Any

import zmq

from minivllm.config import EngineConfig
from minivllm.engine.core import EngineCore
from minivllm.engine.request import Request
from minivllm.engine.serialization import outputs_to_wire, pack, params_from_wire, unpack
from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SEED_MAX, SEED_MIN, is_int

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
_PARENT_CHECK_S = 1.0


def request_from_wire(r: Any, vocab_size: int) -> Request:
    """Rebuild (and re-check) one request sent by the frontend.

    The frontend validated it already; the core checks the values a step would index or
    seed with again, because a bad one here would fail a whole step instead of one request.
    Raises ValueError (or KeyError/TypeError for a malformed message).
    """
    rid = r["request_id"]
    if not isinstance(rid, str):
        raise ValueError("request_id must be a string")
    ids = r["prompt_token_ids"]
    if not isinstance(ids, list) or not ids:
        raise ValueError("prompt_token_ids must be a non-empty list")
    if not all(is_int(t) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size - 1}]")
    seed = r["seed"]
    if seed is not None and not (is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        raise ValueError("seed is out of range")
    params = params_from_wire(r["params"])
    eos_token_ids = frozenset(int(t) for t in r["eos_token_ids"])
    params.check_token_ids(vocab_size, eos_token_ids)  # logit_bias / allowed ids index the logits
    return Request(request_id=rid, prompt_token_ids=ids, params=params,
                   arrival_time=float(r["arrival_time"]), eos_token_ids=eos_token_ids, seed=seed,
                   pooling_params=PoolingParams.from_wire(r.get("pooling_params")))


def add_requests(core: EngineCore, wire_requests: Any, vocab_size: int) -> list[dict[str, Any]]:
    """Add each request; one that cannot be added fails alone. Returns the ``error`` payloads.

    ``invalid`` says whether the caller can fix it (a ValueError: its message is for them);
    any other exception is a bug or an engine limit: logged here, a generic message there.
    """
    errors = []
    for r in wire_requests if isinstance(wire_requests, list) else [wire_requests]:
        rid = r.get("request_id") if isinstance(r, dict) else None
        known = isinstance(rid, str) and rid in core.requests  # a duplicate id: keep the first
        try:
            core.add_request(request_from_wire(r, vocab_size))
        except Exception as e:
            if not known and isinstance(rid, str) and rid in core.requests:  # half added
                core.abort_requests([rid])
            invalid = isinstance(e, ValueError)
            if not invalid:
                logger.exception("adding request %r failed", rid)
            message = str(e) if invalid else f"the engine could not add the request ({type(e).__name__})"
            errors.append({"request_id": rid if isinstance(rid, str) else None,
                           "message": message, "invalid": invalid})
    return errors


def serve_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> bool:
    """Build the core and run its loop until ``shutdown`` or the parent is gone (True), or
    until the loop fails (False, after sending ``dead``). Never raises."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(input_addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(output_addr)
    last_sent = time.monotonic()

    def send(kind: str, payload: Any = None) -> None:
        nonlocal last_sent
        push.send(pack(kind, payload))
        last_sent = time.monotonic()

    try:
        core = EngineCore(config)
        vocab_size = config.arch.vocab_size
        send("ready", {"num_kv_blocks": core.cache_config.num_kv_blocks,
                       "max_model_len": core.scheduler_config.max_model_len,
                       "heartbeat_interval_s": HEARTBEAT_INTERVAL_S})
        parent = multiprocessing.parent_process()
        last_parent_check = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_sent >= HEARTBEAT_INTERVAL_S:
                send("heartbeat")
            # A core whose frontend was killed must not linger.
            if now - last_parent_check > _PARENT_CHECK_S:
                last_parent_check = now
                if parent is not None and not parent.is_alive():
                    return True
            # Idle: wait for input, but wake up for the next heartbeat.
            timeout = 0 if core.has_unfinished else HEARTBEAT_INTERVAL_S * 1000
            while pull.poll(timeout):
                kind, payload = unpack(pull.recv())
                if kind == "shutdown":
                    return True
                if kind == "add":
                    for err in add_requests(core, payload, vocab_size):
                        send("error", err)
                elif kind == "abort":
                    core.abort_requests(payload)
                elif kind == "stats":
                    send("stats", core.stats())
                timeout = 0
            if core.has_unfinished:
                outs = core.step()
                if outs.outputs:
                    send("outputs", outputs_to_wire(outs))
    except Exception as e:
        # The traceback is for the operator's log (the frontend logs it); clients only ever
        # see the exception's type.
        try:
            send("dead", {"error_type": type(e).__name__, "traceback": traceback.format_exc()})
        except Exception:
            pass  # the frontend notices the exit anyway
        return False
    finally:
        push.close(linger=1000)
        pull.close(linger=0)
        ctx.term()


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point: exits 0 after a clean stop, 1 after a fatal failure."""
    # The frontend owns the core's life: Ctrl-C in a terminal or a SIGTERM sent to the whole
    # process group (systemd, docker stop) must reach the frontend, which drains and then
    # stops the core; the core also exits on its own once the frontend is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not serve_engine_core(config, input_addr, output_addr):
        sys.exit(1)
