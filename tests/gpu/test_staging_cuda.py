"""Small host→device uploads of the runner (sampling rows, prompt logprobs) must not wait for
the GPU: a wait there stalls overlapped scheduling for a step. Run on the device:

    PYTHONPATH=. python -m pytest -q tests/gpu/test_staging_cuda.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minivllm.runner.staging import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("data", [[(0, 5), (1, 7)], np.arange(9, dtype=np.int64), [0.5, -2.0]])
def test_upload_is_queued_behind_running_work_not_waited_for(data):
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copy
    dtype = torch.float32 if isinstance(data, list) and isinstance(data[0], float) else torch.int64
    out = to_device(data, dtype, dev)
    # Returned while the sleep still runs: the host did not synchronise the stream.
    assert not torch.cuda.current_stream().query()
    assert torch.equal(out.cpu(), torch.as_tensor(data, dtype=dtype))

