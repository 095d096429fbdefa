"""Pick an attention backend from the user's choice and the device."""

from __future__ import annotations

import logging
import os

import torch

from minivllm.attention.base import AttentionBackend

logger = logging.getLogger(__name__)

VALID_BACKENDS = ("auto", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_head_dims() -> tuple[int, ...]:
    from minivllm.kernels.common import SUPPORTED_HEAD_DIMS

    return SUPPORTED_HEAD_DIMS


def get_attention_backend(name: str, device: torch.device, head_dim: int | None = None) -> AttentionBackend:
    """``auto``: Triton on CUDA (when it supports ``head_dim``), torch reference elsewhere.
    ``triton``/``torch`` force one; a forced Triton that cannot run is a ValueError up front."""
    if name not in VALID_BACKENDS:
        raise ValueError(f"attention_backend must be one of {VALID_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "torch"
        if device.type == "cuda" and triton_usable(device):
            if head_dim is None or head_dim in _triton_head_dims():
                name = "triton"
            else:
                logger.warning("head_dim %d has no Triton kernel; using the torch attention backend",
                               head_dim)
    if name == "triton":
        if not triton_usable(device):
            raise ValueError(
                "attention_backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 on CPU "
                "(and the triton package installed)")
        if head_dim is not None and head_dim not in _triton_head_dims():
            raise ValueError(f"the Triton backend supports head_dim {_triton_head_dims()}, "
                             f"this model has {head_dim}; use attention_backend='torch'")
        from minivllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from minivllm.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()
