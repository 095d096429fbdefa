"""Shared fixtures: tiny random HF models (built here, no hub), the embedded SmolLM2, and
the HF transformers reference."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports them,
# so the Triton backend runs (in the interpreter) on CPU-only machines such as CI.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_VOCAB = 512


def _tiny_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=512, initializer_range=0.08, eos_token_id=None,
                  bos_token_id=None)
    if kind == "llama":  # GQA 4:2, untied head
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False)
    if kind == "llama_tied_mha":  # MHA, tied head, llama3 rope scaling
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "qwen2":  # q/k/v bias, tied head, GQA 4:1
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    if kind == "qwen3":  # per-head q/k norm, explicit head_dim, GQA 8:2
        return Qwen3Config(**common, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                           tie_word_embeddings=False)
    if kind == "qwen3_hd64":  # head_dim 64: a size the Triton kernels support; GQA 4:2
        return Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           tie_word_embeddings=True)
    raise ValueError(kind)


TINY_KINDS = ("llama", "llama_tied_mha", "qwen2", "qwen3", "qwen3_hd64")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Directories with config.json + model.safetensors of tiny random-weight HF models."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, kind in enumerate(TINY_KINDS):
        torch.manual_seed(1234 + i)
        model = AutoModelForCausalLM.from_config(_tiny_config(kind))
        path = tmp_path_factory.mktemp(f"tiny-{kind}")
        model.save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


@pytest.fixture(scope="session")
def hf_tiny_models(tiny_model_dirs):
    """The HF reference model for each tiny directory, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for k, d in tiny_model_dirs.items()}


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers greedy continuation (no EOS stop), the reference for token equality."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(lengths, vocab: int = TINY_VOCAB, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into the cache directory."""
    from minivllm.models.embedded import resolve_model_dir

    return str(resolve_model_dir(None))


@pytest.fixture(scope="session")
def smol_llm(smollm_dir):
    """One engine on the embedded model, shared by the tests that only read from it."""
    from minivllm import LLM

    return LLM(smollm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_smol(smollm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
