"""Triton kernels over the paged KV cache.

``kv_store`` writes a step's K/V at its slots; ``paged_decode`` is split-KV flash-decoding for
pure decode steps (graph-capturable); ``paged_prefill`` is varlen causal attention for mixed
steps (decode rows, prefill and extend chunks over cached prefixes). ``rms_norm``, ``rotary``
(with Qwen3's per-head q/k norm fused in) and ``activation`` (SiLU-and-mul) replace the dozens
of elementwise torch kernels per layer on CUDA. ``fp8`` quantises K/V for an FP8 (e4m3)
cache (the attention kernels read it and dequantise in registers). ``common`` holds the host
checks and sizing, ``testing`` the random paged batches that tests and benchmarks share.
Importing these modules needs ``triton``; the backend and the layers import them lazily.
"""
