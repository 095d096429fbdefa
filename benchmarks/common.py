"""Helpers shared by the engine benchmarks: shared random weights, copy bandwidth, result files."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (best of several)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n / best / 1e9


def best_time_s(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` synchronised calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def shared_random_weights(config_dir: str, device: torch.device, prefix: str):
    """HF model with random bf16 weights (seed 0) and a directory holding them, so that HF and
    minivllm compute with identical weights. Returns ``(config, hf_model, dir, weight_bytes)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    hf.save_pretrained(tmp)
    return cfg, hf, tmp, weight_bytes


def write_results(out_dir: str | None, kind: str, res: dict, table: str) -> None:
    """Print the JSON and the table (last); also write ``<kind>-<device>-<date>.{json,md}``."""
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{kind}-{res['device'].replace(' ', '_')}-{res['date']}"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (out / f"{stem}.md").write_text(table + "\n")
    print(json.dumps(res, indent=2))
    print(table)
