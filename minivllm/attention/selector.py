"""Pick an attention backend from the user's choice and the device."""

from __future__ import annotations

import os

import torch

from minivllm.attention.base import AttentionBackend

VALID_BACKENDS = ("auto", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto``: Triton on CUDA, torch reference elsewhere. ``triton``/``torch`` force one."""
    if name not in VALID_BACKENDS:
        raise ValueError(f"attention_backend must be one of {VALID_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if name == "triton":
        if not triton_usable(device):
            raise ValueError(
                "attention_backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 on CPU "
                "(and the triton package installed)")
        from minivllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from minivllm.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()
