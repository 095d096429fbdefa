"""msgpack encoding of what crosses the ZMQ sockets between frontend and engine core.

Every message is ``[kind, payload]``. Dataclasses travel as dicts of their init fields, so the
receiver rebuilds (and re-validates) them with ``cls(**fields)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from minivllm.engine.messages import EngineCoreOutput, EngineCoreOutputs
from minivllm.sampling_params import SamplingParams


def dataclass_fields(obj: Any) -> dict[str, Any]:
    """The init fields of a dataclass instance (derived fields are rebuilt on the other side)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def pack(kind: str, payload: Any = None) -> bytes:
    return msgpack.packb([kind, payload], use_bin_type=True)


def unpack(data: bytes) -> tuple[str, Any]:
    # Logprob dicts are keyed by token id: integer map keys must be allowed.
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return kind, payload


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    return dataclass_fields(params)


def params_from_wire(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)


def outputs_to_wire(outs: EngineCoreOutputs) -> dict[str, Any]:
    return {"outputs": [dataclass_fields(o) for o in outs.outputs],
            "num_prefill_tokens": outs.num_prefill_tokens,
            "num_decode_tokens": outs.num_decode_tokens}


def outputs_from_wire(fields: dict[str, Any]) -> EngineCoreOutputs:
    return EngineCoreOutputs(outputs=[EngineCoreOutput(**o) for o in fields["outputs"]],
                             num_prefill_tokens=fields["num_prefill_tokens"],
                             num_decode_tokens=fields["num_decode_tokens"])
