"""Programmatic dependent launch, the device side (the launch side is ``common.pdl_options``).

A kernel launched with ``launch_pdl`` may start while the previous kernel in the stream is
still finishing: its launch and block scheduling overlap that kernel's tail, which at batch-1
decode (a few µs per kernel) is a large share of the step. Waiting first makes that safe:
``gdc_wait`` returns once the previous kernel has completed and its writes are visible, and
since every kernel in the chain waits before it finishes, so have all earlier ones.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one: call before any memory
    access that a kernel earlier in the stream may write (or read)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
