"""The interpreter bounds checker (conftest) itself: a deliberate overrun must be caught."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl


def _bounds_checked() -> bool:
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        return False
    return InterpreterBuilder.create_masked_load.__name__ == "checked_load"


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


@pytest.mark.skipif(not _bounds_checked(), reason="only under the Triton interpreter")
def test_overrun_is_caught():
    src, dst = torch.randn(8), torch.empty(8)
    _copy_kernel[(1,)](src, dst, 8, BLOCK=8)
    assert torch.equal(src, dst)
    with pytest.raises(Exception, match="out of bounds"):  # wrapped in InterpreterError
        _copy_kernel[(1,)](src, dst, 9, BLOCK=16)
