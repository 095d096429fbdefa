"""Host-side helpers shared by the Triton kernels: validation and launch sizing."""

from __future__ import annotations

import functools
import os

import torch

LOG2_E = 1.4426950408889634

# Head dims that are not a power of two are padded up to one inside the kernels (masked), so
# 80 and 96 cost the work of 128; the list keeps configs we have tested.
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The KV cache may also be FP8 e4m3 (kv_cache_dtype="fp8"); queries stay in a SUPPORTED_DTYPE.
SUPPORTED_CACHE_DTYPES = SUPPORTED_DTYPES + (torch.float8_e4m3fn,)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in on CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def _supports_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_options(device: torch.device) -> dict:
    """Launch options for programmatic dependent launch (Hopper and later).

    With ``launch_pdl`` a kernel may start while the previous kernel in the stream finishes
    (its launch and its first weight loads overlap that kernel's tail); the kernel's
    ``USE_PDL`` branch waits (``gdc_wait``) before touching any memory the previous kernel
    may write or read, and signals (``gdc_launch_dependents``) that the next may start.
    Elsewhere (CPU interpreter, older GPUs) both are off.
    """
    if _supports_pdl(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the caches have the layout the kernels assume."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in SUPPORTED_CACHE_DTYPES:
        raise ValueError(f"cache dtypes {k_cache.dtype}/{v_cache.dtype} unsupported; "
                         f"use one of {SUPPORTED_CACHE_DTYPES}")
    if k_cache.dtype == torch.bfloat16 and k_cache.device.type != "cuda":
        # The interpreter (Triton 3.9) runs bfloat16 kernels but returns garbage: refuse.
        raise ValueError("the Triton interpreter (CPU) has no working bfloat16; use float16/"
                         "float32 there, or attention_backend='torch'")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    if block_size % 16 != 0:
        raise ValueError(f"block_size must be a multiple of 16, got {block_size}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} unsupported; use one of {SUPPORTED_HEAD_DIMS}")


def check_kv_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> None:
    """An FP8 cache needs its two float32 one-element scales on the cache's device."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"an FP8 KV cache needs {name}")
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != k_cache.device:
            raise ValueError(f"{name} must be a one-element float32 tensor on {k_cache.device}, "
                             f"got {s.dtype} {tuple(s.shape)} on {s.device}")


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           out: torch.Tensor, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> int:
    """Validate query/cache/output shapes; return the GQA group size (query heads per KV head)."""
    check_cache_pair(k_cache, v_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_tokens, num_heads, {head_dim}], got {tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported; use one of {SUPPORTED_DTYPES}")
    if q.dtype != k_cache.dtype and k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise ValueError("the Triton interpreter (CPU) has no working bfloat16; use float16/"
                         "float32 there, or attention_backend='torch'")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out need a contiguous last (head_dim) dimension")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return q.shape[1] // num_kv_heads


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products: TF32 would silently cost ~3 digits."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- elementwise kernels (RMSNorm, rotary, SiLU-and-mul) ----------------------------------
ELEMENTWISE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch option for every kernel here: no multiply-add contraction, so each float32 product
# and sum rounds on its own as in torch's separate kernels (costs nothing: memory-bound).
NO_FP_FUSION = {"enable_fp_fusion": False}
def check_kernel_tensor(t: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``t`` is a float tensor a Triton kernel can run on here."""
    if t.dtype not in ELEMENTWISE_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} unsupported; use one of {ELEMENTWISE_DTYPES}")
    if t.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{name} is on {t.device}: Triton kernels need CUDA, or "
                             "TRITON_INTERPRET=1 (set before the kernels are imported) on CPU")
        if t.dtype == torch.bfloat16:
            # The interpreter (Triton 3.9) runs bfloat16 kernels but returns garbage: refuse.
            raise ValueError(f"{name}: the Triton interpreter (CPU) has no working bfloat16; "
                             "use float16/float32 there")
    if t.dim() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")


def elementwise_num_warps(tile_elements: int) -> int:
    """Warps for a memory-bound tile: ~8 elements per thread (16-byte fp16 vectors), 1 to 16."""
    return max(1, min(16, tile_elements // 256))
