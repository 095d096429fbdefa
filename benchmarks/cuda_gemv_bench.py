"""The CUDA C++ GEMV (csrc/gemv.cu) vs cuBLAS and the Triton GEMV at Qwen3 decode shapes.

    PYTHONPATH=. python3 benchmarks/cuda_gemv_bench.py [--rows 1,2,4] [--dtypes bf16,fp8]

CUDA only; < 1.5 minutes on an H100 once the library is cached (the JIT build of every
variant takes about a minute more on 16 cores). For the Qwen3 0.6B/4B/8B decode
linear shapes (as benchmarks/gemv_sweep.py), bf16 weights and fp8 e4m3 weights with a float32
per-row scale (the Triton GEMV with ``scale``; cuBLAS has no such kernel, so its column is
the bf16 time for reference), at M=1 by default; also each model's LM head (vocab x hidden,
cuBLAS in the model today; ``--no-lm-head`` skips it). Every compiled tile variant of the CUDA op is
timed (``vN``; ``vNp``: persistent grid, one wave of blocks looping over row tiles;
``v0-nopdl``: variant 0 without programmatic dependent launch). Weights rotate past the L2
cache (≥ 300 MB per shape) and each variant is timed inside one CUDA graph, as the decode step
runs it; µs per call, TB/s = weight bytes / time. Each implementation's output is also checked
against the float32 product (``max_rel_err``). ``chosen``: the variant
``cuda_gemv.choose_variant`` picks for the model (``triton``: the dispatcher keeps Triton).

Then the fused ops the model runs at the 0.6B/4B shapes (``--fused-models``): RMSNorm with the
residual add folded into the qkv and gate_up GEMVs (``rms_norm``), and silu(gate) * up folded
into the down projection (``silu_and_mul``), Triton fused kernel vs every CUDA variant, with
the CUDA output's error against the Triton one. Writes cuda-gemv-<device>-<date>.json to $OUT
(or benchmarks/results) and prints the tables last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minivllm.csrc_ops import cuda_gemv
from minivllm.kernels.gemv import gemv as triton_gemv

# Qwen3 decode linear shapes [N, K]: qkv, o, gate_up, down (as benchmarks/gemv_sweep.py,
# which runs its sweep when imported, so the list is repeated here).
SHAPES = {"0.6b": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)],
          "4b": [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)],
          "8b": [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]}
# The LM head ([vocab, hidden]; torch.matmul, i.e. cuBLAS, in the model today): the largest
# single weight read of a small model's decode step.
LM_HEAD = {"0.6b": (151936, 1024), "4b": (151936, 2560), "8b": (151936, 4096)}
ROTATE_BYTES = 300_000_000


def graph_time_us(fn, reps: int) -> float:
    """Best-of-5 µs per call of ``fn`` (which makes ``reps`` calls), replayed from one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    del graph
    return best


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row absmax fp8 e4m3 weight and its float32 scale."""
    scale = (w.float().abs().amax(dim=1) / 448.0).clamp_min(1e-12)
    return (w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale.contiguous()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def cuda_configs() -> dict[str, dict]:
    configs = {f"v{i}": dict(variant=i) for i in range(len(cuda_gemv.variants()))}
    configs.update({f"v{i}p": dict(variant=i, persistent=True)
                    for i in range(len(cuda_gemv.variants()))})
    configs["v0-nopdl"] = dict(variant=0, pdl=False)
    return configs


def bench_shape(model: str, layer: str, n: int, k: int, rows: list[int],
                dtypes: list[str]) -> list[dict]:
    dev = torch.device("cuda")
    copies = max(4, -(-ROTATE_BYTES // (n * k * 2)))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    configs = cuda_configs()
    results, cublas_us = [], {}
    for wname in dtypes:
        if wname == "fp8":
            quant = [quantize_fp8(w) for w in ws]
            ws_run, scales = [q for q, _ in quant], [s for _, s in quant]
            deq0 = ws_run[0].float() * scales[0][:, None]
        else:
            ws_run, scales, deq0 = ws, [None] * copies, ws[0].float()
        nbytes = n * k * ws_run[0].element_size()
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = x.float() @ deq0.t()
            pairs = list(zip(ws_run, scales))
            row = dict(model=model, layer=layer, n=n, k=k, m=m, weight=wname,
                       mb=round(nbytes / 1e6, 2))
            errs = {"triton": rel_err(triton_gemv(x, ws_run[0], scale=scales[0]), ref)}
            if wname == "bf16":
                errs["cublas"] = rel_err(F.linear(x, ws[0]), ref)
                cublas_us[m] = graph_time_us(lambda x=x: [F.linear(x, w) for w in ws], copies)
            row["cublas_bf16_us"] = round(cublas_us[m], 2) if m in cublas_us else None
            row["triton_us"] = round(graph_time_us(
                lambda x=x, pairs=pairs: [triton_gemv(x, w, scale=s) for w, s in pairs], copies), 2)
            cuda_us = {}
            for name, cfg in configs.items():
                errs[name] = rel_err(cuda_gemv.gemv(x, ws_run[0], scale=scales[0], **cfg), ref)
                cuda_us[name] = round(graph_time_us(
                    lambda x=x, pairs=pairs, cfg=cfg: [cuda_gemv.gemv(x, w, scale=s, **cfg)
                                                       for w, s in pairs], copies), 2)
            best = min(cuda_us, key=cuda_us.get)
            chosen = chosen_config(n, k, ws_run[0].element_size(), "gemv")
            row.update(cuda_us=cuda_us, cuda_best=best, cuda_best_us=cuda_us[best],
                       chosen=chosen, chosen_us=row["triton_us"] if chosen == "triton" else cuda_us[chosen],
                       cuda_best_tbs=round(nbytes / cuda_us[best] / 1e6, 3),
                       triton_tbs=round(nbytes / row["triton_us"] / 1e6, 3),
                       speedup_vs_triton=round(row["triton_us"] / cuda_us[best], 3),
                       max_rel_err=max(errs.values()), rel_errs={a: f"{e:.2e}" for a, e in errs.items()})
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def chosen_config(n: int, k: int, weight_bytes: int, op: str) -> str:
    """The benchmark's name (vN / vNp) of the model's choice, or "triton"."""
    choice = cuda_gemv.choose_variant(n, k, weight_bytes, op)
    if choice is None:
        return "triton"
    return f"v{choice.variant}{'p' if choice.persistent else ''}"


# The fused ops per model: (layer, op, N, K) with K the weight's input width (the silu input
# is 2K wide). qkv and gate_up carry the block's pre-norm and residual add; down the SiLU.
FUSED = {"0.6b": [("qkv", "rms_norm", 4096, 1024), ("gate_up", "rms_norm", 6144, 1024),
                  ("down", "silu_and_mul", 1024, 3072)],
         "4b": [("qkv", "rms_norm", 6144, 2560), ("gate_up", "rms_norm", 19456, 2560),
                ("down", "silu_and_mul", 2560, 9728)]}


def bench_fused(model: str, layer: str, op: str, n: int, k: int, dtypes: list[str]) -> list[dict]:
    """Triton fused kernel vs every CUDA variant of the same fused op, M=1, as bench_shape."""
    from minivllm.kernels.gemv import rms_norm_gemv as triton_rms_norm_gemv

    dev = torch.device("cuda")
    copies = max(4, -(-ROTATE_BYTES // (n * k * 2)))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if op == "silu_and_mul" else k, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(k, device=dev)).bfloat16()
    if op == "rms_norm":
        def triton_op(w, s):
            return triton_rms_norm_gemv(x, res, nw, 1e-6, w, None, s)[0]

        def cuda_op(w, s, **cfg):
            return cuda_gemv.rms_norm_gemv(x, res, nw, 1e-6, w, None, s, **cfg)[0]
    else:
        def triton_op(w, s):
            return triton_gemv(x, w, act=op, scale=s)

        def cuda_op(w, s, **cfg):
            return cuda_gemv.gemv(x, w, act=op, scale=s, **cfg)
    configs = {name: cfg for name, cfg in cuda_configs().items() if "nopdl" not in name}
    results = []
    for wname in dtypes:
        if wname == "fp8":
            quant = [quantize_fp8(w) for w in ws]
            pairs = [(q, s) for q, s in quant]
        else:
            pairs = [(w, None) for w in ws]
        nbytes = n * k * pairs[0][0].element_size()
        ref = triton_op(*pairs[0]).float()
        row = dict(model=model, layer=layer, op=op, n=n, k=k, m=1, weight=wname,
                   mb=round(nbytes / 1e6, 2))
        row["triton_us"] = round(graph_time_us(
            lambda pairs=pairs: [triton_op(w, s) for w, s in pairs], copies), 2)
        cuda_us, errs = {}, {}
        for name, cfg in configs.items():
            errs[name] = rel_err(cuda_op(*pairs[0], **cfg), ref)
            cuda_us[name] = round(graph_time_us(
                lambda cfg=cfg, pairs=pairs: [cuda_op(w, s, **cfg) for w, s in pairs], copies), 2)
        best = min(cuda_us, key=cuda_us.get)
        chosen = chosen_config(n, k, pairs[0][0].element_size(), op)
        row.update(cuda_us=cuda_us, cuda_best=best, cuda_best_us=cuda_us[best], chosen=chosen,
                   chosen_us=row["triton_us"] if chosen == "triton" else cuda_us[chosen],
                   speedup_vs_triton=round(row["triton_us"] / cuda_us[best], 3),
                   max_rel_err_vs_triton=max(errs.values()))
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def fused_tables(rows: list[dict], names: list[str]) -> str:
    header = ("| model | layer (fused op) | n×k | w | Triton fused µs | CUDA best µs | best | chosen "
              "| chosen µs | Triton / CUDA best | max rel err vs Triton |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} ({r['op']}) | {r['n']}×{r['k']} | {r['weight']} "
                     f"| {r['triton_us']} | {r['cuda_best_us']} | {r['cuda_best']} | {r['chosen']} "
                     f"| {r['chosen_us']} | {r['speedup_vs_triton']}× "
                     f"| {r['max_rel_err_vs_triton']:.1e} |")
    lines += ["", "Fused CUDA variants, µs", "",
              "| model | layer | w | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['weight']} | "
                     + " | ".join(str(r["cuda_us"][c]) for c in names) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    if os.environ.get("MINIVLLM_GIT_COMMIT"):
        return os.environ["MINIVLLM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _label(r: dict) -> str:
    return f"{r['model']}{' lm_head' if r['layer'] == 'lm_head' else ''} | {r['n']}×{r['k']}"


def tables(rows: list[dict], names: list[str]) -> str:
    header = ("| model | n×k | w | m | MB | cuBLAS bf16 µs | Triton µs (TB/s) | CUDA best µs (TB/s) "
              "| best | chosen | chosen µs | Triton / CUDA best "
              "| cuBLAS / CUDA best |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_cublas = (f"{r['cublas_bf16_us'] / r['cuda_best_us']:.2f}×"
                     if r["weight"] == "bf16" and r["cublas_bf16_us"] else "—")
        lines.append(f"| {_label(r)} | {r['weight']} | {r['m']} | {r['mb']} "
                     f"| {r['cublas_bf16_us'] or '—'} | {r['triton_us']} ({r['triton_tbs']}) "
                     f"| {r['cuda_best_us']} ({r['cuda_best_tbs']}) | {r['cuda_best']} "
                     f"| {r['chosen']} | {r['chosen_us']} | {r['speedup_vs_triton']}× | {vs_cublas} |")
    lines += ["", "CUDA variants, µs (vN: tile variant N; p: persistent grid; nopdl: no PDL)", "",
              "| model | n×k | w | m | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {_label(r)} | {r['weight']} | {r['m']} | "
                     + " | ".join(str(r["cuda_us"][c]) for c in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1", help="comma-separated M values (1..4)")
    ap.add_argument("--dtypes", default="bf16,fp8", help="weights: bf16 and/or fp8")
    ap.add_argument("--models", default=",".join(SHAPES), help="subset of " + ",".join(SHAPES))
    ap.add_argument("--no-lm-head", action="store_true", help="skip the LM head shapes")
    ap.add_argument("--fused-models", default=",".join(FUSED),
                    help="models whose fused ops to time (subset of " + ",".join(FUSED) + "; '' skips)")
    args = ap.parse_args()
    rows = [int(v) for v in args.rows.split(",")]
    dtypes = args.dtypes.split(",")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    start = time.perf_counter()
    ok = cuda_gemv.available()
    load_s = time.perf_counter() - start
    print(f"csrc/gemv.cu: available={ok} build_s={cuda_gemv.build_seconds():.1f} "
          f"(0 = cached) load_s={load_s:.1f} variants (rows, threads, unroll)={cuda_gemv.variants()}",
          flush=True)
    if not ok:
        raise SystemExit("the CUDA GEMV did not build; see the warning above")
    results = []
    for model in args.models.split(","):
        shapes = [("linear", n, k) for n, k in SHAPES[model]]
        shapes += [] if args.no_lm_head else [("lm_head", *LM_HEAD[model])]
        for layer, n, k in shapes:
            results.extend(bench_shape(model, layer, n, k, rows, dtypes))
    fused = []
    for model in filter(None, args.fused_models.split(",")):
        for layer, op, n, k in FUSED[model]:
            fused.extend(bench_fused(model, layer, op, n, k, dtypes))
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    short = re.search(r"(h100|h200|h20|a100|a800|l40s|b200|gb200)", name)
    date = datetime.date.today().isoformat()
    res = {"benchmark": "cuda_gemv", "device": torch.cuda.get_device_name(), "date": date,
           "git_commit": git_commit(), "build_s": round(cuda_gemv.build_seconds(), 2),
           "load_s": round(load_s, 2), "variants": cuda_gemv.variants(),
           "total_s": round(time.perf_counter() - start, 1), "rows": results, "fused": fused}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cuda-gemv-{short.group(1) if short else name}-{date}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {path}; build {res['build_s']} s, total {res['total_s']} s; variants "
          f"(rows, threads, unroll): {res['variants']}\n")
    print(tables(results, list(cuda_configs())))
    if fused:
        print("\n" + fused_tables(fused, [c for c in cuda_configs() if "nopdl" not in c]))


if __name__ == "__main__":
    main()
