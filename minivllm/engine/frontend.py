"""What every frontend (LLM, AsyncLLM) sets up in the user's process: the tokenizer, the EOS ids
and the input/output processors around the engine core."""

from __future__ import annotations

from dataclasses import dataclass

from minivllm.config import EngineConfig
from minivllm.engine.input_processor import InputProcessor
from minivllm.engine.output_processor import OutputProcessor
from minivllm.tokenizer import load_tokenizer


@dataclass
class Frontend:
    tokenizer: object | None
    eos_token_ids: frozenset[int]
    input_processor: InputProcessor
    output_processor: OutputProcessor


def build_frontend(config: EngineConfig) -> Frontend:
    """Tokenizer (None for tokenizer-less dummy models or ``skip_tokenizer_init``), the EOS ids
    of the model's configs and tokenizer, and fresh processors."""
    tokenizer = None
    if not config.skip_tokenizer_init:
        tokenizer = load_tokenizer(config.tokenizer_dir or config.model_dir, config.trust_remote_code)
    eos = set(config.arch.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    eos_ids = frozenset(eos)
    return Frontend(tokenizer, eos_ids, InputProcessor(tokenizer, config.arch.vocab_size, eos_ids),
                    OutputProcessor(tokenizer))
