"""Triton kernels over the paged KV cache.

``kv_store`` writes a step's K/V at its slots; ``paged_decode`` is split-KV flash-decoding for
pure decode steps (graph-capturable); ``paged_prefill`` is varlen causal attention for mixed
steps (decode rows, prefill and extend chunks over cached prefixes). ``common`` holds the host
checks and sizing, ``testing`` the random paged batches that tests and benchmarks share.
Importing these modules needs ``triton``; the attention backend imports them lazily.
"""
