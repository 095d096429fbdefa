"""Fixtures of the server tests: a tiny random model with the embedded model's real tokenizer and
chat template (fast on CPU, and every text / chat path works), its engine, and servers on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from minivllm.entrypoints.openai.settings import ServerSettings
from tests.server.helpers import ServerThread

CHAT_NAME = "tiny-chat"


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm_dir) -> str:
    """A 2-layer random llama with SmolLM2's vocabulary, tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.08, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(4321)
    path = tmp_path_factory.mktemp("tiny-chat")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        src = Path(smollm_dir) / name
        if src.exists():
            shutil.copy(src, path / name)
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat_engine(tiny_chat_dir):
    from minivllm import AsyncLLM

    engine = AsyncLLM(tiny_chat_dir, device="cpu")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_chat_llm(tiny_chat_dir):
    """The offline API on the same weights: the reference for what the server returns."""
    from minivllm import LLM

    return LLM(tiny_chat_dir, device="cpu")


@pytest.fixture(scope="session")
def chat_server(tiny_chat_engine):
    """Default settings."""
    srv = ServerThread(tiny_chat_engine, CHAT_NAME)
    yield srv
    srv.stop()


STRICT = ServerSettings(api_key="sekret", allowed_origins=("http://allowed.example",), max_concurrent_requests=2,
                        max_n=4, max_prompts_per_request=8, max_request_body_bytes=256 * 1024,
                        max_open_connections=260, timeout_request_read_s=2.0, timeout_keep_alive_s=1.0)


@pytest.fixture(scope="session")
def strict_server(tiny_chat_engine):
    """Small limits, short timeouts, an API key and one allowed CORS origin."""
    srv = ServerThread(tiny_chat_engine, CHAT_NAME, STRICT)
    yield srv
    srv.stop()
