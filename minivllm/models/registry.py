"""Maps HF ``architectures`` names to our model classes."""

from __future__ import annotations

from torch import nn

from minivllm.models import pooling
from minivllm.models.llama import LlamaForCausalLM
from minivllm.models.qwen2 import Qwen2ForCausalLM
from minivllm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    # Pooling models (task "classify" / "embed").
    **{cls.__name__: cls for cls in (
        pooling.LlamaForSequenceClassification, pooling.Qwen2ForSequenceClassification,
        pooling.Qwen3ForSequenceClassification, pooling.LlamaModel, pooling.Qwen2Model,
        pooling.Qwen3Model)},
}


def get_model_class(architecture: str) -> type[nn.Module]:
    """Raises ValueError naming the supported architectures when ``architecture`` is unknown."""
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[architecture]
