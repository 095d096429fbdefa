"""The CUDA C++ decode GEMV (``csrc/gemv.cu``): ``y = x @ W.T * scale + bias`` for 1..4 rows.

Same contract as :func:`minivllm.kernels.gemv.gemv` without the fused activations: ``x`` is
``[M, K]`` fp16/bf16 (``M`` in 1..4), ``weight`` ``[N, K]`` in ``x``'s dtype, or 8-bit
(fp8 e4m3 / int8) with ``scale`` its float32 ``[N]`` per-row scales; ``bias`` ``[N]`` in
``x``'s dtype. The kernel reads 16-byte vectors, so it also needs ``K`` a multiple of 8 (16 for
8-bit weights) and 16-byte aligned rows (:func:`supports` says whether operands qualify).

Every operand is validated before anything is built, so bad input raises ``ValueError`` even
where the op is unavailable. The launch allocates only the output (through torch), runs on
the current stream and never synchronises: CUDA-graph capturable.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

from minivllm.csrc_ops.build import BuiltLibrary, load

MAX_ROWS = 4
ACT_DTYPES = (torch.float16, torch.bfloat16)
QUANT_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)
# Codes shared with csrc/gemv.cu (ActDtype, WeightKind).
_ACT_CODE = {torch.float16: 0, torch.bfloat16: 1}
_WEIGHT_CODE = {torch.float8_e4m3fn: 1, torch.int8: 2}
# A/B knob for the lead's wiring: the model uses this op only where this is "1".
ENABLE_ENV = "MINIVLLM_CUDA_GEMV"
# Default tile variant (csrc/gemv.cu kVariants); benchmarks/cuda_gemv_bench.py compares all.
DEFAULT_VARIANT = 0


@functools.cache
def _library() -> BuiltLibrary | None:
    built = load("gemv")
    if built is None:
        return None
    lib = built.lib
    lib.minivllm_gemv.restype = ctypes.c_int
    lib.minivllm_gemv.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,          # x, stride_x, act dtype
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,          # w, stride_w_bytes, weight kind
        ctypes.c_void_p, ctypes.c_void_p,                       # bias, scale
        ctypes.c_void_p, ctypes.c_int64,                        # out, stride_out
        ctypes.c_int, ctypes.c_int, ctypes.c_int,               # num_rows, n, k
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # variant, sms, persistent, pdl
        ctypes.c_void_p,                                        # stream
    ]
    lib.minivllm_gemv_num_variants.restype = ctypes.c_int
    lib.minivllm_gemv_num_variants.argtypes = []
    lib.minivllm_gemv_variant.restype = ctypes.c_int
    lib.minivllm_gemv_variant.argtypes = [ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 3
    lib.minivllm_cuda_error_string.restype = ctypes.c_char_p
    lib.minivllm_cuda_error_string.argtypes = [ctypes.c_int]
    lib.minivllm_gemv_probe.restype = ctypes.c_int
    lib.minivllm_gemv_probe.argtypes = []
    err = lib.minivllm_gemv_probe()  # built is not enough: the driver must run it
    if err != 0:
        warnings.warn("minivllm csrc op 'gemv' built but cannot run here "
                      f"({lib.minivllm_cuda_error_string(err).decode()}); using the Triton path",
                      RuntimeWarning, stacklevel=2)
        return None
    return built


def available() -> bool:
    """Whether the CUDA GEMV can run here: a CUDA device, nvcc, and a successful build (the
    first call builds or loads the cached library; a failure warns once and returns False)."""
    return _library() is not None


@functools.cache
def enabled() -> bool:
    """``available()`` and ``MINIVLLM_CUDA_GEMV=1`` (read once): the A/B switch for callers."""
    return os.environ.get(ENABLE_ENV, "0") == "1" and available()


def build_seconds() -> float:
    """Seconds this process spent compiling the library (0 when it came from the cache)."""
    built = _library()
    return built.build_s if built is not None else 0.0


def variants() -> list[tuple[int, int, int]]:
    """``(rows per block, threads per block, unroll)`` of each compiled tile variant."""
    built = _library()
    if built is None:
        return []
    out = []
    for i in range(built.lib.minivllm_gemv_num_variants()):
        vals = [ctypes.c_int() for _ in range(3)]
        built.lib.minivllm_gemv_variant(i, *(ctypes.byref(v) for v in vals))
        out.append(tuple(v.value for v in vals))
    return out


def _vector_elems(weight: torch.Tensor) -> int:
    return 16 // weight.element_size()  # weight elements per 16-byte load


def check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless the CUDA GEMV can compute ``x @ weight.T * scale + bias``."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gemv wants 2-D x and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, (n, k) = x.shape[0], weight.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv handles 1..{MAX_ROWS} rows, got {m}")
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, weight {tuple(weight.shape)} wants {k}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} unsupported; use one of {ACT_DTYPES}")
    if scale is None and weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype, or "
                         "pass the 8-bit weight's per-row scale")
    if scale is not None and (weight.dtype not in QUANT_WEIGHT_DTYPES or scale.shape != (n,)
                              or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"an 8-bit weight ({QUANT_WEIGHT_DTYPES}) needs a float32 [{n}] scale")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor of {x.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need contiguous last dimensions")
    vec = _vector_elems(weight)
    if k % vec or (weight.stride(0) * weight.element_size()) % 16 or (x.stride(0) * x.element_size()) % 16 \
            or x.data_ptr() % 16 or weight.data_ptr() % 16:
        raise ValueError(f"the CUDA GEMV reads 16-byte vectors: K ({k}) must be a multiple of {vec} "
                         "and the rows of x and weight 16-byte aligned; use "
                         "minivllm.kernels.gemv.gemv for other layouts")
    tensors = [t for t in (x, weight, bias, scale) if t is not None]
    if any(t.device.type != "cuda" for t in tensors) or len({t.device for t in tensors}) != 1:
        raise ValueError("the CUDA GEMV needs all operands on one CUDA device, got "
                         f"{sorted({str(t.device) for t in tensors})}")


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> bool:
    """Whether :func:`gemv` accepts these operands (``check_operands`` without raising)."""
    try:
        check_operands(x, weight, bias, scale)
    except ValueError:
        return False
    return True


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         scale: torch.Tensor | None = None, variant: int = DEFAULT_VARIANT,
         persistent: bool = False, pdl: bool = True) -> torch.Tensor:
    """``x @ weight.T * scale + bias`` (``scale`` for 8-bit weights) as ``[M, N]`` in
    ``x``'s dtype, by the CUDA kernel of ``csrc/gemv.cu``.

    ``variant`` picks a compiled tile shape (:func:`variants`), ``persistent`` launches one
    wave of blocks that loop over the row tiles instead of one block per tile, ``pdl=False``
    launches without programmatic dependent launch (these three are for benchmarks).

    Raises:
        ValueError: on operands :func:`check_operands` rejects, or an unknown variant.
        RuntimeError: if the op is unavailable here (check :func:`available` first) or the
        launch fails.
    """
    check_operands(x, weight, bias, scale)
    built = _library()
    if built is None:
        raise RuntimeError("the CUDA GEMV is unavailable here; check csrc_ops.available() and "
                           "use minivllm.kernels.gemv.gemv")
    num_variants = built.lib.minivllm_gemv_num_variants()
    if not 0 <= variant < num_variants:
        raise ValueError(f"variant must be in 0..{num_variants - 1}, got {variant}")
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    device = x.device
    capability = torch.cuda.get_device_capability(device)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        err = built.lib.minivllm_gemv(
            x.data_ptr(), x.stride(0), _ACT_CODE[x.dtype],
            weight.data_ptr(), weight.stride(0) * weight.element_size(),
            _WEIGHT_CODE.get(weight.dtype, 0) if scale is not None else 0,
            bias.data_ptr() if bias is not None else None,
            scale.data_ptr() if scale is not None else None,
            out.data_ptr(), out.stride(0), m, n, k, variant,
            _num_sms(device), int(persistent), int(pdl and capability[0] >= 9), stream)
    if err != 0:
        detail = (built.lib.minivllm_cuda_error_string(err).decode() if err > 0
                  else "unsupported combination")
        raise RuntimeError(f"CUDA GEMV launch failed: {detail}")
    return out


def gemv_if_enabled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`gemv` where :func:`enabled` and :func:`supports` allow it, else ``None`` (the
    caller then runs its Triton/torch path): the one call an A/B wiring needs."""
    if not enabled() or not supports(x, weight, bias, scale):
        return None
    return gemv(x, weight, bias, scale=scale)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
