"""The engine-core loop (``core_proc``) without a model: a fake core behind real ZMQ sockets,
served in a thread. Per-request intake failures fail that request alone; a failing loop
reports ``dead`` (traceback for the log, the type for clients) and returns False (the
process entry then exits 1); an idle or busy core keeps sending heartbeats."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from minivllm.engine import core_proc
from minivllm.engine.messages import EngineCoreOutput, EngineCoreOutputs
from minivllm.engine.serialization import pack, params_to_wire, unpack
from minivllm.sampling_params import SamplingParams

VOCAB = 100


class FakeCore:
    """Just enough of EngineCore: requests finish after one step; hooks make it fail."""

    def __init__(self, config) -> None:
        self.cache_config = SimpleNamespace(num_kv_blocks=8)
        self.scheduler_config = SimpleNamespace(max_model_len=64)
        self.requests: dict = {}
        self.fail_add_with: Exception | None = None
        self.fail_step_with: Exception | None = None
        FakeCore.instance = self

    def add_request(self, req) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if self.fail_add_with is not None and req.request_id.endswith("boom"):
            self.requests[req.request_id] = req  # fails half-way, as a real bug might
            raise self.fail_add_with
        self.requests[req.request_id] = req

    def abort_requests(self, ids, reason: str = "abort") -> None:
        for rid in ids:
            self.requests.pop(rid, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> EngineCoreOutputs:
        if self.fail_step_with is not None:
            raise self.fail_step_with
        outs = [EngineCoreOutput(rid, [1], finish_reason="length") for rid in self.requests]
        self.requests.clear()
        return EngineCoreOutputs(outs)

    def stats(self) -> dict:
        return {"num_running": len(self.requests)}


@pytest.fixture
def core(tmp_path, monkeypatch):
    """A served FakeCore: (send, receive, thread result)."""
    monkeypatch.setattr(core_proc, "EngineCore", FakeCore)
    monkeypatch.setattr(core_proc, "HEARTBEAT_INTERVAL_S", 0.1)
    ctx = zmq.Context()
    to_core, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    to_core.bind(f"ipc://{tmp_path}/in")
    from_core.bind(f"ipc://{tmp_path}/out")
    result: dict = {}
    config = SimpleNamespace(arch=SimpleNamespace(vocab_size=VOCAB))
    thread = threading.Thread(target=lambda: result.setdefault("ok", core_proc.serve_engine_core(
        config, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out")), daemon=True)
    thread.start()

    def send(kind, payload=None):
        to_core.send(pack(kind, payload), flags=zmq.NOBLOCK)

    def receive(kind: str, timeout_s: float = 10.0):
        """The next message of ``kind`` (others are skipped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if from_core.poll(100):
                k, payload = unpack(from_core.recv())
                if k == kind:
                    return payload
        raise AssertionError(f"no {kind!r} message within {timeout_s} s")

    assert receive("ready")["heartbeat_interval_s"] == 0.1
    yield SimpleNamespace(send=send, receive=receive, result=result, thread=thread)
    if thread.is_alive():
        send("shutdown")
    thread.join(10)
    to_core.close(0)
    from_core.close(0)
    ctx.term()


def wire(rid: str, ids=(1, 2, 3), seed=None, **params) -> dict:
    return {"request_id": rid, "prompt_token_ids": list(ids), "arrival_time": 0.0,
            "params": params_to_wire(SamplingParams(**params)), "eos_token_ids": [0], "seed": seed}


def test_bad_requests_fail_alone_and_the_loop_goes_on(core):
    top_k = wire("0:topk")
    top_k["params"]["top_k"] = 2**63  # bypassed the frontend's checks: the core checks again
    seed = wire("0:seed", seed="7")  # (msgpack cannot even carry ints beyond uint64)
    no_params = wire("0:malformed")
    del no_params["params"]
    unknown = wire("0:unknown")
    unknown["params"]["frobnicate"] = 1
    batch = [top_k, wire("0:ok"), seed, wire("0:vocab", ids=[1, VOCAB]), no_params, unknown,
             {"not": "a request"}, "garbage"]
    core.send("add", batch)
    errors = {}
    for _ in range(len(batch) - 1):
        e = core.receive("error")
        errors[e["request_id"]] = e
    assert "top_k" in errors["0:topk"]["message"] and errors["0:topk"]["invalid"]
    assert "seed" in errors["0:seed"]["message"]
    assert "0, 99" in errors["0:vocab"]["message"]
    assert not errors["0:malformed"]["invalid"] and "KeyError" in errors["0:malformed"]["message"]
    assert not errors["0:unknown"]["invalid"] and "TypeError" in errors["0:unknown"]["message"]
    assert None in errors  # the two without a usable id
    outs = core.receive("outputs")["outputs"]
    assert [o["request_id"] for o in outs] == ["0:ok"]
    core.send("add", [wire("0:later")])
    assert [o["request_id"] for o in core.receive("outputs")["outputs"]] == ["0:later"]
    assert core.thread.is_alive()


def test_unexpected_add_failure_is_cleaned_up_and_duplicates_keep_the_first(core):
    FakeCore.instance.fail_add_with = RuntimeError("internal trouble in /some/path.py")
    core.send("add", [wire("0:boom")])
    err = core.receive("error")
    assert err["request_id"] == "0:boom" and not err["invalid"]
    assert "RuntimeError" in err["message"] and "/some/path" not in err["message"]
    core.send("stats")
    assert core.receive("stats") == {"num_running": 0}  # the half-added request is gone
    core.send("add", [wire("0:dup"), wire("0:dup")])
    assert "duplicate" in core.receive("error")["message"]
    assert [o["request_id"] for o in core.receive("outputs")["outputs"]] == ["0:dup"]


def test_heartbeats_while_idle(core):
    t0 = time.monotonic()
    for _ in range(3):
        core.receive("heartbeat", timeout_s=5)
    assert time.monotonic() - t0 < 5


def test_fatal_step_reports_dead_and_returns_false(core):
    FakeCore.instance.fail_step_with = RuntimeError("CUDA error: an illegal memory access")
    core.send("add", [wire("0:x")])
    dead = core.receive("dead")
    assert dead["error_type"] == "RuntimeError"
    assert "Traceback" in dead["traceback"] and "illegal memory access" in dead["traceback"]
    core.thread.join(10)
    assert core.result == {"ok": False}
