"""Qwen3: the Llama block with per-head RMSNorm on q and k before rotary."""

from minivllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """q/k norm per head; q/k/v bias only when the config asks for it."""

    qk_norm = True
