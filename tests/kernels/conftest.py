"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it must be set
before ``minivllm.kernels`` is first imported; pytest imports this file before the test modules
of this folder. (A run that imports the kernels earlier, from another folder, needs the
variable set in its environment instead.)

Under the interpreter every masked load and store is also checked to stay inside the storage
of the tensors passed to the kernel: an out-of-bounds access fails the test instead of
silently reading junk or corrupting a neighbour (on a GPU that shows up far away, if at all).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def generator() -> torch.Generator:
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"KERNEL_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def _install_bounds_checker() -> bool:
    """Wrap the interpreter's launch and memory ops (private API: skipped if it moved)."""
    try:
        from triton.runtime import interpreter as ti
        executor, builder = ti.GridExecutor, ti.InterpreterBuilder
        init_args, load, store = (executor._init_args_hst, builder.create_masked_load,
                                  builder.create_masked_store)
        np_dtype = ti._get_np_dtype
    except (ImportError, AttributeError):
        return False
    ranges: list[tuple[int, int]] = []

    def init_args_recording(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges.clear()
        for arg in [*args_hst, *kwargs_hst.values()]:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args_hst, kwargs_hst

    def check(ptrs, mask, what: str) -> None:
        addresses = ptrs.data.astype(np.uint64)[mask.data.astype(bool)]
        size = np.dtype(np_dtype(ptrs.get_element_ty())).itemsize
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in ranges:
            inside |= (addresses >= lo) & (addresses + size <= hi)
        if not inside.all():
            raise AssertionError(f"kernel {what} out of bounds at {(~inside).sum()} addresses")

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, cache_policy)

    executor._init_args_hst = init_args_recording
    builder.create_masked_load = checked_load
    builder.create_masked_store = checked_store
    return True


BOUNDS_CHECKED = os.environ.get("TRITON_INTERPRET") == "1" and _install_bounds_checker()
