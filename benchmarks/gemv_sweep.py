"""cuBLAS vs the Triton GEMV (minivllm/kernels/gemv.py) at batch-1..4 decode shapes (CUDA only).

    PYTHONPATH=. python benchmarks/gemv_sweep.py [sweep,silu,quant]

Weights are rotated past the L2 cache (≥ 300 MB per shape) and each variant is timed inside
one CUDA graph, as the decode step runs it. "sweep" also tries every tile config at M=1 and
reports the best next to gemv_config's choice; "silu" times the down projection with the
SiLU-and-mul fused into its input against activation kernel + matmul; "quant" sweeps the tile
configs for fp8 e4m3 weights with a per-row scale (1-byte weights, issue 11) at M=1 against the
bf16 default. JSON to $OUT.
"""
import itertools, json, os, sys
import torch, torch.nn.functional as F
from minivllm.kernels.gemv import gemv, gemv_config
from minivllm.kernels.common import num_sms
dev = torch.device("cuda"); dt = torch.bfloat16
SHAPES = {"0.6b": [(4096,1024),(1024,2048),(6144,1024),(1024,3072)],
          "4b": [(6144,2560),(2560,4096),(19456,2560),(2560,9728)],
          "8b": [(6144,4096),(4096,4096),(24576,4096),(4096,12288)]}
def timeit(fn, reps):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    best = 1e9
    for _ in range(5):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best
rows = []
SECTIONS = sys.argv[1].split(",") if len(sys.argv) > 1 else ["sweep", "silu"]
QUANT_CFGS = list(itertools.product((4, 8, 16), (512, 1024, 2048), (2, 4, 8)))
for model, shapes in (SHAPES.items() if "sweep" in SECTIONS else []):
    for (n, k) in shapes:
        nbytes = n * k * 2
        copies = max(4, -(-300_000_000 // nbytes))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        for m in (1, 2, 4):
            x = torch.randn(m, k, device=dev, dtype=dt)
            ref = F.linear(x, ws[0]).float()
            out = gemv(x, ws[0]).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            t_cublas = timeit(lambda: [F.linear(x, w) for w in ws], copies)
            t_def = timeit(lambda: [gemv(x, w) for w in ws], copies)
            best = (t_def, gemv_config(n, k, num_sms(dev)))  # 2-byte weights here
            if m == 1:
                for bn, bk, nw in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8)):
                    if bn * bk > 16384: continue
                    try:
                        t = timeit(lambda: [gemv(x, w, config=(bn, bk, nw)) for w in ws], copies)
                    except Exception as e:
                        continue
                    if t < best[0]: best = (t, (bn, bk, nw))
            r = dict(model=model, n=n, k=k, m=m, mb=nbytes/1e6, cublas_us=round(t_cublas,2), gemv_us=round(t_def,2),
                     best_us=round(best[0],2), best_cfg=best[1], default_cfg=gemv_config(n,k,num_sms(dev)),
                     gemv_tbs=round(nbytes/t_def/1e6,2), cublas_tbs=round(nbytes/t_cublas/1e6,2), rel_err=rel)
            rows.append(r); print(r, flush=True)
        del ws
# fused silu: down proj
for model, (n, k) in ((("0.6b", (1024, 3072)), ("4b", (2560, 9728))) if "silu" in SECTIONS else ()):
    copies = max(4, -(-300_000_000 // (n*k*2)))
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2*k, device=dev, dtype=dt)
    from minivllm.layers.activation import silu_and_mul
    ref = F.linear(silu_and_mul(x), ws[0]).float(); out = gemv(x, ws[0], act="silu_and_mul").float()
    t_unf = timeit(lambda: [F.linear(silu_and_mul(x), w) for w in ws], copies)
    t_f = timeit(lambda: [gemv(x, w, act="silu_and_mul") for w in ws], copies)
    t_lin = timeit(lambda: [gemv(x[:, :k].contiguous(), w) for w in ws], copies)
    cfgs = {}
    for cfg in ((4,1024,8),(4,1024,4),(4,512,4),(4,512,8),(8,1024,8),(4,2048,8),(2,1024,4),(2,2048,8)):
        cfgs[str(cfg)] = round(timeit(lambda: [gemv(x, w, act="silu_and_mul", config=cfg) for w in ws], copies), 2)
    r = dict(model=model, fused_silu=True, n=n, k=k, unfused_us=round(t_unf,2), fused_us=round(t_f,2), gemv_only_us=round(t_lin,2), cfgs=cfgs, rel_err=((out-ref).norm()/ref.norm()).item())
    rows.append(r); print(r, flush=True)
# fp8 weights (per-row scale): 1-byte weights halve the bytes, the input row re-read per program
# does not shrink, so the best tile may differ from bf16's
for model, shapes in (SHAPES.items() if "quant" in SECTIONS else []):
    for (n, k) in shapes:
        copies = max(4, -(-300_000_000 // (n * k)))
        w16 = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        scale = (w16.float().abs().amax(dim=1) / 448.0).contiguous()
        w8 = (w16.float() / scale[:, None]).to(torch.float8_e4m3fn)
        ws = [w8.clone() for _ in range(copies)]
        ws16 = [w16.clone() for _ in range(max(4, -(-300_000_000 // (2 * n * k))))]
        x = torch.randn(1, k, device=dev, dtype=dt)
        ref = F.linear(x.float(), w8.float() * scale[:, None])
        out = gemv(x, w8, scale=scale).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        t_bf16 = timeit(lambda: [gemv(x, w) for w in ws16], len(ws16))
        t_def = timeit(lambda: [gemv(x, w, scale=scale) for w in ws], copies)
        cfgs = {}
        for cfg in QUANT_CFGS:
            try:
                cfgs[cfg] = timeit(lambda: [gemv(x, w, scale=scale, config=cfg) for w in ws], copies)
            except Exception:  # noqa: BLE001 - a config the compiler rejects (registers) is skipped
                continue
        best = min(cfgs.items(), key=lambda kv: kv[1])
        top = sorted(cfgs.items(), key=lambda kv: kv[1])[:5]
        r = dict(model=model, quant="fp8", n=n, k=k, m=1, mb=n * k / 1e6, bf16_us=round(t_bf16, 2),
                 fp8_default_us=round(t_def, 2), best_us=round(best[1], 2), best_cfg=best[0],
                 top5={str(c): round(t, 2) for c, t in top}, rel_err=rel,
                 fp8_best_tbs=round(n * k / best[1] / 1e6, 2))
        rows.append(r); print(r, flush=True)
        del ws, ws16
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv_sweep.json"), "w"), indent=1)
print("\n| model | n×k | MB | m | cuBLAS µs | gemv µs | best µs (cfg) |")
for r in rows:
    if "quant" in r:
        print(f"| {r['model']} fp8 | {r['n']}×{r['k']} | {r['mb']:.1f} | 1 | bf16 gemv {r['bf16_us']} | {r['fp8_default_us']} | {r['best_us']} {r['best_cfg']} ({r['fp8_best_tbs']} TB/s) |")
    elif "fused_silu" in r:
        print(f"| {r['model']} silu+down | {r['n']}×{r['k']} | | 1 | {r['unfused_us']} (unfused) | {r['fused_us']} (gemv only {r['gemv_only_us']}) | {r['cfgs']} |")
    else:
        print(f"| {r['model']} | {r['n']}×{r['k']} | {r['mb']:.1f} | {r['m']} | {r['cublas_us']} | {r['gemv_us']} | {r['best_us']} {r['best_cfg']} |")
