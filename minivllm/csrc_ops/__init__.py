"""CUDA C++ ops from ``csrc/``, built just-in-time where nvcc and a CUDA device exist.

Always optional: each op has a Triton/torch counterpart that the model uses by default, and
``available()`` says whether the CUDA build works here (CI has no CUDA: it is False there).
``build`` compiles and caches the libraries; ``cuda_gemv`` is the batch-1..4 decode GEMV.
"""

from minivllm.csrc_ops.cuda_gemv import (
    available,
    check_operands,
    check_rms_norm_operands,
    choose_variant,
    enabled,
    gemv,
    rms_norm_gemv,
    supports,
    supports_rms_norm,
)

__all__ = ["available", "check_operands", "check_rms_norm_operands", "choose_variant", "enabled",
           "gemv", "rms_norm_gemv", "supports", "supports_rms_norm"]
