"""The one place that decides which batch-1 decode GEMV runs: the CUDA C++ op or Triton.

Every GEMV call site of the model (dense and quantised linear layers, the fused pre-norm of
qkv / gate_up, the fused SiLU of the down projection, the LM head) calls :func:`gemv` or
:func:`rms_norm_gemv` here, with the contracts of :mod:`minivllm.kernels.gemv`. They run the
CUDA op (:mod:`minivllm.csrc_ops.cuda_gemv`, same numerics) where it is enabled
(the default; ``MINIVLLM_CUDA_GEMV=0``, read once, turns it off; and the library builds
and runs here), accepts the
operands (16-byte aligned rows, ...) and its per-shape choice does not prefer Triton; else the
Triton kernel, which also does the validation: bad input raises ``ValueError`` either way.

:func:`prepare` is called when a CUDA model is loaded, so the library is built (or loaded from
its cache) then, never inside the first forward pass or a CUDA-graph capture.
"""

from __future__ import annotations

import logging

import torch

from minivllm.csrc_ops import cuda_gemv

logger = logging.getLogger(__name__)

CUDA = "cuda"
TRITON = "triton"


def implementation() -> str:
    """``"cuda"`` where the CUDA op is enabled and runs here, else ``"triton"``."""
    return CUDA if cuda_gemv.enabled() else TRITON


def prepare(device: torch.device) -> str:
    """At model load: build or load the CUDA op where it is enabled (a no-op elsewhere) and log
    which GEMV implementation the decode step will use. Returns :func:`implementation`."""
    impl = implementation() if device.type == "cuda" else TRITON
    if device.type == "cuda":
        extra = (f" (csrc/gemv.cu, built in {cuda_gemv.build_seconds():.1f} s; 0 = cached)"
                 if impl == CUDA else f" (the CUDA C++ op is off or did not build: {cuda_gemv.ENABLE_ENV})")
        logger.info("batch-1 GEMV: %s%s", impl, extra)
    return impl


def _cuda_choice(x: torch.Tensor, weight: torch.Tensor, op: str) -> cuda_gemv.LaunchChoice | None:
    """The CUDA launch for these (already supported) operands, or None where Triton is faster."""
    del x
    return cuda_gemv.choose_variant(weight.shape[0], weight.shape[1], weight.element_size(), op)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         act: str | None = None, *, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x) @ weight.T + bias`` (``* scale`` per row for 8-bit weights) for ``x`` of at most
    4 rows: :func:`minivllm.kernels.gemv.gemv`'s contract, by the CUDA op where it applies.

    Raises:
        ValueError: on operands the Triton GEMV rejects (shapes, dtypes, rows, ``act``).
    """
    if cuda_gemv.enabled() and cuda_gemv.supports(x, weight, bias, scale, act):
        choice = _cuda_choice(x, weight, act or "gemv")
        if choice is not None:
            return cuda_gemv.gemv(x, weight, bias, act, scale=scale, variant=choice.variant,
                                  persistent=choice.persistent)
    # Imported here: only a CUDA device needs triton.
    from minivllm.kernels.gemv import gemv as triton_gemv

    return triton_gemv(x, weight, bias, act, scale=scale)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ weight.T + bias, x + residual)`` in one launch:
    :func:`minivllm.kernels.gemv.rms_norm_gemv`'s contract, by the CUDA op where it applies.

    Raises:
        ValueError: on operands the Triton kernel rejects.
    """
    if cuda_gemv.enabled() and cuda_gemv.supports_rms_norm(x, residual, norm_weight, weight,
                                                           bias, scale):
        choice = _cuda_choice(x, weight, "rms_norm")
        if choice is not None:
            return cuda_gemv.rms_norm_gemv(x, residual, norm_weight, eps, weight, bias, scale,
                                           variant=choice.variant, persistent=choice.persistent)
    from minivllm.kernels.gemv import rms_norm_gemv as triton_rms_norm_gemv

    return triton_rms_norm_gemv(x, residual, norm_weight, eps, weight, bias, scale)
