"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it must be set
before ``minivllm.kernels`` is first imported; pytest imports this file before the test modules
of this folder. (A run that imports the kernels earlier, from another folder, needs the
variable set in its environment instead.)
"""

from __future__ import annotations

import os

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
