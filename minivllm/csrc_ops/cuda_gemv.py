"""The CUDA C++ decode GEMV (``csrc/gemv.cu``): ``y = in @ W.T * scale + bias`` for 1..4 rows.

Same contracts as :func:`minivllm.kernels.gemv.gemv` and :func:`~minivllm.kernels.gemv.rms_norm_gemv`,
with the same numerics for the fused input ops: ``x`` is ``[M, K]`` fp16/bf16 (``M`` in 1..4;
``[M, 2K]`` = ``cat(gate, up)`` for ``act="silu_and_mul"``; the fused ops take ``M = 1``, the
batch-1 decode step that uses them), ``weight`` ``[N, K]`` in ``x``'s
dtype, or 8-bit (fp8 e4m3 / int8) with ``scale`` its float32 ``[N]`` per-row scales; ``bias``
``[N]`` in ``x``'s dtype. The kernel reads 16-byte vectors, so it also needs ``K`` a multiple of
8 (16 for 8-bit weights) and 16-byte aligned rows; the fused RMSNorm stages the normalised rows
in shared memory (``K * 2`` bytes, at most 48 KiB). :func:`supports` and
:func:`supports_rms_norm` say whether operands qualify.

Every operand is validated before anything is built, so bad input raises ``ValueError`` even
where the op is unavailable. The launch allocates only its outputs (through torch), runs on
the current stream and never synchronises: CUDA-graph capturable.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from typing import NamedTuple

import torch

from minivllm.csrc_ops.build import BuiltLibrary, load

MAX_ROWS = 4
ACT_DTYPES = (torch.float16, torch.bfloat16)
QUANT_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)
ACTIVATIONS = (None, "silu_and_mul")
# Codes shared with csrc/gemv.cu (ActDtype, WeightKind, InputOp).
_ACT_CODE = {torch.float16: 0, torch.bfloat16: 1}
_WEIGHT_CODE = {torch.float8_e4m3fn: 1, torch.int8: 2}
_IN_PLAIN, _IN_SILU_AND_MUL, _IN_RMS_NORM = 0, 1, 2
# The fused RMSNorm stages its normalised row in shared memory; csrc/gemv.cu kMaxStagedBytes.
MAX_STAGED_BYTES = 48 * 1024
# A/B knob for the model: minivllm.layers.gemv_dispatch uses this op only where this is "1".
ENABLE_ENV = "MINIVLLM_CUDA_GEMV"


class LaunchChoice(NamedTuple):
    """A compiled tile variant (index into :func:`variants`) and whether the grid is persistent."""
    variant: int
    persistent: bool


def choose_variant(n: int, k: int, weight_bytes: int, op: str = "gemv") -> LaunchChoice | None:
    """The tile variant for an ``[n, k]`` weight of ``weight_bytes``-byte elements, or ``None``
    where the Triton GEMV measured faster (the dispatcher then runs that).

    ``op`` (``"gemv"``, ``"silu_and_mul"``, ``"rms_norm"``). Read off the H100 sweeps of every
    variant at the Qwen3 0.6B/4B/8B decode shapes, M=1 (benchmarks/cuda_gemv_bench.py; results
    in benchmarks/results/cuda-gemv-h100-2026-11-25.md): the plain GEMV takes the CUDA op
    (within 3.5 % of its best variant; 1.0-1.45x faster than Triton). The fused ops take it
    only where it measured faster than Triton's fused kernel: the RMSNorm input with 2-byte
    weights up to 8192 rows (0.6B qkv 6.62 -> 4.96 µs, gate_up 7.05 -> 6.44, 4B qkv 14.9 ->
    13.4; 4B gate_up, 19456 rows, was a tie) and with 1-byte weights beyond 8192 rows (4B
    gate_up 24.0 -> 21.8; below, Triton's 1-byte tiles win: 0.6B qkv 3.29 vs 4.06). The
    SiLU-and-mul input tied within 3 % everywhere: Triton keeps it.

    Variants (rows, threads, unroll): 0 (2, 128, 4), 1 (4, 64, 4), 2 (1, 256, 4), 3 (8, 64, 2).
    """
    if op == "silu_and_mul":
        return None
    if op == "rms_norm" and (n > 8192) != (weight_bytes == 1):
        return None
    # Few row tiles: one wave looping beats a ragged second wave.
    persistent = n <= 1024 or (op == "rms_norm" and n >= 8192)
    if weight_bytes == 1:
        if (n, k) == (4096, 4096):
            return None  # Triton 7.31 µs, best variant 8.01 µs
        if n <= 1024:
            return LaunchChoice(0, persistent)
        if n >= 6144 and (k <= 1024 or (k >= 4096 and n <= 8192)):
            return LaunchChoice(3, persistent)  # 8 rows per block: the x vectors reused most
        return LaunchChoice(1, persistent)
    if k <= 1024 and n >= 2048:
        return LaunchChoice(1 if n >= 65536 else 3, persistent)
    if 2560 < k <= 4096 and 2560 <= n <= 8192:
        return LaunchChoice(1, persistent or n <= 4096)
    if k >= 8192 and n >= 4096:
        return LaunchChoice(2, persistent)
    return LaunchChoice(0, persistent)


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
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,          # input op, residual, stride_res
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,       # norm weight, residual_out, stride
        ctypes.c_float,                                         # eps
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
    """``available()`` unless ``MINIVLLM_CUDA_GEMV=0`` (the A/B switch for benchmarks): on by
    default where it builds, since it measured faster (W2 Qwen3-0.6B on an H100: 968 -> 1026
    decode tok/s). The first call builds (or loads) the library: call it at model load."""
    return os.environ.get(ENABLE_ENV, "1") != "0" and available()


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


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned start and rows (the kernel's vector loads)."""
    return t.data_ptr() % 16 == 0 and (t.dim() == 1 or (t.stride(0) * t.element_size()) % 16 == 0)


def check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, act: str | None = None) -> None:
    """Raise ``ValueError`` unless the CUDA GEMV can compute ``act(x) @ weight.T * scale + bias``."""
    _check_layout(x, weight, bias, scale, act)
    _check_device(x, weight, bias, scale)


def _check_layout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  scale: torch.Tensor | None, act: str | None) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gemv wants 2-D x and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, (n, k) = x.shape[0], weight.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv handles 1..{MAX_ROWS} rows, got {m}")
    if act is not None and m != 1:
        raise ValueError(f"the CUDA GEMV fuses {act} for one row, got {m}")
    width = 2 * k if act == "silu_and_mul" else k
    if x.shape[1] != width:
        raise ValueError(f"x has {x.shape[1]} columns, weight {tuple(weight.shape)} wants {width}")
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
    if k % vec or not _aligned(weight) or not _aligned(x):
        raise ValueError(f"the CUDA GEMV reads 16-byte vectors: K ({k}) must be a multiple of {vec} "
                         "and the rows of x and weight 16-byte aligned; use "
                         "minivllm.kernels.gemv.gemv for other layouts")


def check_rms_norm_operands(x: torch.Tensor, residual: torch.Tensor | None,
                            norm_weight: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None,
                            scale: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless the CUDA GEMV can compute
    ``rms_norm(x + residual) * norm_weight @ weight.T * scale + bias``."""
    if x.dim() == 2 and x.shape[0] != 1:
        raise ValueError(f"the CUDA GEMV fuses the RMSNorm for one row, got {x.shape[0]}")
    _check_layout(x, weight, bias, scale, None)
    m, k = x.shape
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(1) != 1 or not _aligned(residual)):
        raise ValueError(f"residual must match x {tuple(x.shape)} / {x.dtype} with 16-byte "
                         "aligned, contiguous rows")
    if (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype
            or not norm_weight.is_contiguous() or not _aligned(norm_weight)):
        raise ValueError(f"norm weight must be a contiguous, 16-byte aligned [{k}] tensor of "
                         f"{x.dtype}, got {tuple(norm_weight.shape)} {norm_weight.dtype}")
    if m * k * x.element_size() > MAX_STAGED_BYTES:
        raise ValueError(f"the fused RMSNorm stages {k} activations in shared memory, more "
                         f"than {MAX_STAGED_BYTES} bytes; use minivllm.kernels.gemv.rms_norm_gemv")
    _check_device(x, weight, bias, scale, residual, norm_weight)


def _check_device(*tensors: torch.Tensor | None) -> None:
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cuda" for t in present) or len({t.device for t in present}) != 1:
        raise ValueError("the CUDA GEMV needs all operands on one CUDA device, got "
                         f"{sorted({str(t.device) for t in present})}")


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, act: str | None = None) -> bool:
    """Whether :func:`gemv` accepts these operands (``check_operands`` without raising)."""
    try:
        check_operands(x, weight, bias, scale, act)
    except ValueError:
        return False
    return True


def supports_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None) -> bool:
    """Whether :func:`rms_norm_gemv` accepts these operands."""
    try:
        check_rms_norm_operands(x, residual, norm_weight, weight, bias, scale)
    except ValueError:
        return False
    return True


def _resolve_choice(built: BuiltLibrary, weight: torch.Tensor, op: str, variant: int | None,
                    persistent: bool | None) -> LaunchChoice:
    num_variants = built.lib.minivllm_gemv_num_variants()
    if variant is None:
        chosen = choose_variant(*weight.shape, weight.element_size(), op) or LaunchChoice(0, False)
        variant = chosen.variant
        persistent = chosen.persistent if persistent is None else persistent
    if not 0 <= variant < num_variants:
        raise ValueError(f"variant must be in 0..{num_variants - 1}, got {variant}")
    return LaunchChoice(variant, bool(persistent))


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         scale: torch.Tensor | None, op: str, variant: int | None, persistent: bool | None,
         pdl: bool, residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, residual_out: torch.Tensor | None = None) -> torch.Tensor:
    built = _library()
    if built is None:
        raise RuntimeError("the CUDA GEMV is unavailable here; check csrc_ops.available() and "
                           "use minivllm.kernels.gemv")
    choice = _resolve_choice(built, weight, op, variant, persistent)
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    device = x.device
    capability = torch.cuda.get_device_capability(device)
    input_op = {"gemv": _IN_PLAIN, "silu_and_mul": _IN_SILU_AND_MUL, "rms_norm": _IN_RMS_NORM}[op]
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        err = built.lib.minivllm_gemv(
            x.data_ptr(), x.stride(0), _ACT_CODE[x.dtype],
            weight.data_ptr(), weight.stride(0) * weight.element_size(),
            _WEIGHT_CODE.get(weight.dtype, 0) if scale is not None else 0,
            bias.data_ptr() if bias is not None else None,
            scale.data_ptr() if scale is not None else None,
            out.data_ptr(), out.stride(0), m, n, k, input_op,
            residual.data_ptr() if residual is not None else None,
            residual.stride(0) if residual is not None else 0,
            norm_weight.data_ptr() if norm_weight is not None else None,
            residual_out.data_ptr() if residual_out is not None else None,
            residual_out.stride(0) if residual_out is not None else 0, eps,
            choice.variant, _num_sms(device), int(choice.persistent),
            int(pdl and capability[0] >= 9), stream)
    if err != 0:
        detail = (built.lib.minivllm_cuda_error_string(err).decode() if err > 0
                  else "unsupported combination")
        raise RuntimeError(f"CUDA GEMV launch failed: {detail}")
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         act: str | None = None, *, scale: torch.Tensor | None = None,
         variant: int | None = None, persistent: bool | None = None,
         pdl: bool = True) -> torch.Tensor:
    """``act(x) @ weight.T * scale + bias`` (``scale`` for 8-bit weights) as ``[M, N]`` in
    ``x``'s dtype, by the CUDA kernel of ``csrc/gemv.cu``; ``act="silu_and_mul"`` reads ``x``
    as ``cat(gate, up)`` and multiplies by ``silu(gate) * up`` (rounded as the Triton GEMV).

    ``variant`` picks a compiled tile shape (:func:`variants`; default :func:`choose_variant`),
    ``persistent`` launches one wave of blocks that loop over the row tiles instead of one
    block per tile (default: the chosen one's), ``pdl=False`` launches without programmatic
    dependent launch (these three are for benchmarks).

    Raises:
        ValueError: on operands :func:`check_operands` rejects, or an unknown variant.
        RuntimeError: if the op is unavailable here (check :func:`available` first) or the
        launch fails.
    """
    check_operands(x, weight, bias, scale, act)
    return _run(x, weight, bias, scale, act or "gemv", variant, persistent, pdl)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, *, variant: int | None = None,
                  persistent: bool | None = None,
                  pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ weight.T * scale + bias, x + residual)`` in one launch, as
    :func:`minivllm.kernels.gemv.rms_norm_gemv` (without ``residual``: the norm of ``x``, and
    ``x`` returned as the residual stream). Launch knobs as :func:`gemv`.

    Raises:
        ValueError: on operands :func:`check_rms_norm_operands` rejects, or an unknown variant.
        RuntimeError: as :func:`gemv`.
    """
    check_rms_norm_operands(x, residual, norm_weight, weight, bias, scale)
    residual_out = (torch.empty(x.shape, dtype=x.dtype, device=x.device)
                    if residual is not None else None)
    out = _run(x, weight, bias, scale, "rms_norm", variant, persistent, pdl, residual=residual,
               norm_weight=norm_weight, eps=float(eps), residual_out=residual_out)
    return out, (residual_out if residual_out is not None else x)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
