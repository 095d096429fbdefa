"""The interpreter bounds checker (conftest) itself: a deliberate overrun must be caught."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from conftest import BOUNDS_CHECKED


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


@pytest.mark.skipif(not BOUNDS_CHECKED, reason="only under the Triton interpreter")
def test_overrun_is_caught():
    src, dst = torch.randn(8), torch.empty(8)
    _copy_kernel[(1,)](src, dst, 8, BLOCK=8)
    assert torch.equal(src, dst)
    with pytest.raises(Exception, match="out of bounds"):  # wrapped in InterpreterError
        _copy_kernel[(1,)](src, dst, 9, BLOCK=16)
