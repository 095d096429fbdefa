"""One host→device copy per step: host arrays packed into a pinned buffer, copied at once.

A step's small inputs (token ids, positions, slot mapping, row indices, changed block-table
entries, new rows' sampling settings) are written as numpy views into one pinned byte buffer
and copied with a single non-blocking transfer; the device side gets typed views of one device
buffer. Two host buffers alternate: while step N's copy may still be queued, step N+1 is
written into the other one (the engine waits for step N-1 before preparing step N+1).
"""

from __future__ import annotations

import numpy as np
import torch

# Every array starts 64-byte aligned: Triton specialises kernels on 16-byte pointer alignment,
# so an array that were aligned only sometimes would compile a second kernel variant mid-run.
_ALIGN = 64


class StagingBuffer:
    """Collects arrays for one step, then ``upload()`` returns their device views."""

    def __init__(self, device: torch.device, capacity_bytes: int = 1 << 16) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self._host = [self._alloc_host(capacity_bytes) for _ in range(2)]
        self._device_buf = (torch.empty(capacity_bytes, dtype=torch.uint8, device=device)
                            if self.pin else None)
        self._which = 0
        self._entries: list[tuple[int, int, np.dtype, tuple[int, ...]]] = []
        self._used = 0

    def _alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def begin(self) -> None:
        """Start a step: switch to the other host buffer."""
        self._which ^= 1
        self._entries = []
        self._used = 0

    def put(self, array: np.ndarray) -> int:
        """Stage a copy of ``array``; returns a handle for ``upload``'s result list."""
        array = np.ascontiguousarray(array)
        nbytes = array.nbytes
        offset = self._used
        end = offset + nbytes
        host = self._host[self._which]
        if end > host.numel():
            # Grow: keep what is staged so far. Rare (sizes are bounded by the token budget).
            bigger = self._alloc_host(max(2 * host.numel(), end + _ALIGN))
            bigger[:offset].copy_(host[:offset])
            self._host[self._which] = host = bigger
        host.numpy()[offset:end] = array.view(np.uint8).reshape(-1)
        self._entries.append((offset, nbytes, array.dtype, array.shape))
        self._used = -(-end // _ALIGN) * _ALIGN
        return len(self._entries) - 1

    def upload(self) -> list[torch.Tensor]:
        """Copy everything staged with one transfer; device tensors in ``put`` order."""
        host = self._host[self._which]
        if self.pin:
            if self._device_buf.numel() < self._used:
                self._device_buf = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
            dev = self._device_buf
            dev[:self._used].copy_(host[:self._used], non_blocking=True)
        else:
            # CPU: the "device" is host memory. Views of a buffer reused two steps later are
            # fine here, because CPU steps finish before the next one is prepared.
            dev = host
        out = []
        for offset, nbytes, dtype, shape in self._entries:
            t = dev[offset:offset + nbytes].view(torch.from_numpy(np.empty(0, dtype)).dtype)
            out.append(t.view(shape))
        return out


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list/array as a device tensor, without waiting for the device.

    A copy from pageable host memory synchronises the stream first (CUDA's rule for pageable
    transfers), which would stall overlapped scheduling for a whole step; from pinned memory
    it is queued like a kernel. CPU: the tensor itself.
    """
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)

