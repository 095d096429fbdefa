"""Qwen2 / Qwen2.5: the Llama block with bias on the q/k/v projections."""

from minivllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 always carries q/k/v bias, whatever ``attention_bias`` says."""

    qkv_bias_default = True
