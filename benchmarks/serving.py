"""Online serving benchmark (what ``vllm bench serve`` does), next to the offline number.

    PYTHONPATH=. python benchmarks/serving.py --model benchmarks/models/qwen3-0.6b \
        --request-rate inf --out benchmarks/results           # GPU: W1's 256 requests at once
    PYTHONPATH=. python benchmarks/serving.py --request-rate 8 --num-prompts 128 ...  # Poisson
    PYTHONPATH=. python benchmarks/serving.py --base-url http://127.0.0.1:8000 --served-model-name M
    PYTHONPATH=. python benchmarks/serving.py --smoke                 # CPU, tiny model, seconds

Starts ``minivllm serve`` in a subprocess (dummy weights from the config directory, unless
``--base-url`` names a running server) and sends W1's requests (``benchmarks/w1.py``: random
token-id prompts of 100-1024 tokens, ``max_tokens`` 100-1024, temperature 0.6, ``ignore_eos``)
to ``/v1/completions``, streaming, over HTTP/1.1 (one connection per request, asyncio streams:
no client library needed). Arrivals: all at once (``--request-rate inf``) or a Poisson process
at that rate (exponential gaps, seeded); ``--max-concurrency`` caps requests in flight.

Per request: TTFT (send → first streamed token), ITL (gaps between streamed chunks), TPOT
((end − first token) / (output tokens − 1)), end-to-end latency; output tokens come from the
final ``usage`` chunk. Requests ask for ``logprobs: 0`` by default so every generated token is
streamed in its own chunk even for a model without a tokenizer (dummy weights: text deltas may
be empty); ``--no-logprobs`` turns it off. Then, in the same run and with the server stopped,
the offline number: ``LLM.generate`` on the same weights, prompts and sampling parameters —
the difference is the cost of serving (HTTP, JSON, SSE, the engine-core process hop).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


# ---- workload ----------------------------------------------------------------------------
def w1_requests(num_prompts: int, seed: int = 0) -> list[BenchRequest]:
    """The first ``num_prompts`` of W1's cold batch (same stream as ``benchmarks/w1.py``)."""
    from benchmarks.w1 import NUM_PROMPTS, w1_batch

    prompts, max_tokens = w1_batch(random.Random(seed), NUM_PROMPTS)
    if num_prompts > NUM_PROMPTS:
        extra_p, extra_m = w1_batch(random.Random(seed + 1), num_prompts - NUM_PROMPTS)
        prompts, max_tokens = prompts + extra_p, max_tokens + extra_m
    return [BenchRequest(p, m) for p, m in zip(prompts[:num_prompts], max_tokens[:num_prompts])]


def smoke_requests(num_prompts: int, vocab: int, seed: int = 0) -> list[BenchRequest]:
    """Short prompts and outputs for a CPU run."""
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(vocab) for _ in range(rng.randint(4, 24))], rng.randint(4, 12))
            for _ in range(num_prompts)]


# ---- HTTP client (asyncio streams) -------------------------------------------------------
async def _read_body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives, de-chunked (``Transfer-Encoding: chunked``) or raw."""
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def stream_completion(host: str, port: int, body: dict, api_key: str | None = None):
    """POST ``/v1/completions`` with ``stream: true``; yields each SSE ``data:`` payload (bytes)
    the moment its event is complete. Raises RuntimeError on a non-200 answer."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
    try:
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").split(" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode(errors="replace").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if len(status) < 2 or status[1] != "200":
            body_bytes = b"".join([c async for c in _read_body_chunks(reader, headers)])
            raise RuntimeError(f"HTTP {' '.join(status[1:]).strip()}: {body_bytes[:300]!r}")
        buf = b""
        async for chunk in _read_body_chunks(reader, headers):
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.splitlines():
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
    finally:
        writer.close()


async def send_request(host: str, port: int, model: str, req: BenchRequest, logprobs: bool,
                       api_key: str | None) -> RequestResult:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens,
            "temperature": 0.6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if logprobs:
        body["logprobs"] = 0
    res = RequestResult(prompt_tokens=len(req.prompt_token_ids))
    start = time.perf_counter()
    last = None
    try:
        async for data in stream_completion(host, port, body, api_key):
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            msg = json.loads(data)
            if "error" in msg:
                raise RuntimeError(msg["error"].get("message", str(msg["error"])))
            if msg.get("usage"):
                res.output_tokens = msg["usage"]["completion_tokens"]
            if not msg.get("choices"):
                continue
            if last is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            last = now
        res.e2e_s = time.perf_counter() - start
        res.ok = last is not None and res.output_tokens == req.max_tokens
        if not res.ok:
            res.error = f"got {res.output_tokens} of {req.max_tokens} tokens"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(host: str, port: int, model: str, requests: list[BenchRequest], rate: float,
                   max_concurrency: int | None, logprobs: bool, api_key: str | None,
                   seed: int = 0) -> tuple[list[RequestResult], float]:
    """Send every request (Poisson arrivals at ``rate`` per second, or all at once for inf);
    returns the results in request order and the wall time from first send to last answer."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req: BenchRequest) -> RequestResult:
        if sem is None:
            return await send_request(host, port, model, req, logprobs, api_key)
        async with sem:
            return await send_request(host, port, model, req, logprobs, api_key)

    start = time.perf_counter()
    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(req)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """vLLM-style aggregate metrics over the successful requests (times in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
        arr = np.asarray(values) * 1000.0
        return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}

    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s, "output_tok_s": out_tokens / duration_s,
        "total_tok_s": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": stats([r.ttft_s for r in ok]), "tpot_ms": stats(tpot),
        "itl_ms": stats([x for r in ok for x in r.itl_s]), "e2e_ms": stats([r.e2e_s for r in ok]),
        # Above 1 when the server fell behind the engine and merged steps into one chunk.
        "tokens_per_chunk": out_tokens / max(sum(len(r.itl_s) + 1 for r in ok), 1),
    }


# ---- the server under test ---------------------------------------------------------------
def start_server(model: str, engine_flags: list[str], num_requests: int,
                 timeout_s: float = 600.0) -> tuple[subprocess.Popen, str, int, float]:
    """``minivllm serve`` on a free loopback port; returns (process, host, port, start-up s)."""
    cmd = [sys.executable, "-m", "minivllm", "serve", model, "--port", "0", *engine_flags,
           "--max-concurrent-requests", str(max(256, num_requests)), "--disable-access-log"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    watchdog = threading.Timer(timeout_s, proc.kill)  # a server that never listens is killed
    watchdog.start()
    try:
        for line in proc.stdout:  # the server prints its address once it listens
            sys.stdout.write(f"[server] {line}")
            m = re.search(r"on http://([^:\s]+):(\d+)", line)
            if m:
                host, port = m.group(1), int(m.group(2))
                break
        else:
            raise RuntimeError(f"minivllm serve exited with code {proc.wait()} before listening")
        _wait_healthy(f"http://{host}:{port}", deadline)
    except BaseException:
        stop_server(proc)
        raise
    finally:
        watchdog.cancel()
    # Keep reading its stdout so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [sys.stdout.write(f"[server] {ln}") for ln in proc.stdout],
                     daemon=True).start()
    return proc, host, port, time.perf_counter() - t0


def _wait_healthy(base_url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}/health did not answer 200")
        time.sleep(0.2)


def scrape_counters(host: str, port: int, api_key: str | None) -> dict[str, float]:
    """The server's ``minivllm:*_total`` counters from ``/metrics`` (empty if unavailable)."""
    req = urllib.request.Request(f"http://{host}:{port}/metrics",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    found = re.findall(r"^minivllm:(\w+)_total(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    counters: dict[str, float] = {}
    for name, value in found:
        counters[name] = counters.get(name, 0.0) + float(value)
    return counters


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (graceful drain), then kill after 60 s; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# ---- offline reference ----------------------------------------------------------------------
def run_offline(model: str, engine_kwargs: dict, requests: list[BenchRequest], logprobs: bool) -> dict:
    """``LLM.generate`` on the same weights, prompts and parameters; one short warm-up first."""
    import torch

    from minivllm import LLM, SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    llm = LLM(model, **engine_kwargs)
    startup_s = time.perf_counter() - t0
    lp = 0 if logprobs else None
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=r.max_tokens, logprobs=lp)
              for r in requests]
    llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    sync()
    t = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(r.prompt_token_ids) for r in requests)
    num_preemptions = llm.stats().get("num_preemptions")
    llm.engine.shutdown()
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"duration_s": wall, "output_tokens": n_out, "request_throughput": len(requests) / wall,
            "output_tok_s": n_out / wall, "total_tok_s": (n_in + n_out) / wall, "startup_s": startup_s,
            "num_preemptions": num_preemptions}


# ---- main -----------------------------------------------------------------------------------
def _tiny_model_dir() -> str:
    """A tiny Qwen3 config (dummy weights) for ``--smoke``."""
    from transformers import Qwen3Config

    path = Path(tempfile.mkdtemp(prefix="minivllm-serving-smoke-"))
    Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                eos_token_id=None, bos_token_id=None,
                architectures=["Qwen3ForCausalLM"]).save_pretrained(path)
    return str(path)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _table(res: dict) -> str:
    s, off = res["serving"], res.get("offline")
    rate = res["request_rate"]
    lines = [f"| device | requests | rate | req/s | out tok/s | offline out tok/s | serving/offline "
             f"| TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ratio = f"{s['output_tok_s'] / off['output_tok_s']:.2f}" if off else "-"
    pct = lambda m: "/".join(_fmt(s[m][f"p{p}"], ".0f") for p in PERCENTILES)  # noqa: E731
    lines.append(f"| {res['device']} | {s['completed']} ok, {s['failed']} failed | {rate} | "
                 f"{s['request_throughput']:.2f} | {s['output_tok_s']:.0f} | "
                 f"{_fmt(off['output_tok_s'], '.0f') if off else '-'} | {ratio} | {pct('ttft_ms')} | "
                 f"{pct('tpot_ms')} | {pct('itl_ms')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b",
                    help="config dir (dummy weights) or checkpoint the server and LLM load")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096, help="W1's (default %(default)s)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=256, help="first N of W1 (default %(default)s)")
    ap.add_argument("--request-rate", type=float, default=None,
                    help="Poisson arrivals per second; inf: all at once (default; 20 with --smoke)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    ap.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    ap.add_argument("--no-logprobs", dest="logprobs", action="store_false",
                    help="do not ask for logprobs: 0 (then a tokenizer-less model streams no "
                         "per-token chunks and TTFT/ITL lose meaning)")
    ap.add_argument("--base-url", default=None, help="benchmark a running server (no offline run)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--api-key", default=os.environ.get("MINIVLLM_API_KEY"))
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: tiny dummy model, 8 short requests at 20 req/s")
    ap.add_argument("--out", default=None, help="directory for serving-<device>-<date>.{json,md}")
    args = ap.parse_args()

    if args.smoke:
        args.model, args.device, args.dtype, args.max_model_len = _tiny_model_dir(), "cpu", "float32", 256
        if args.num_prompts == 256:
            args.num_prompts = 8
        if args.request_rate is None:
            args.request_rate = 20.0
        requests = smoke_requests(args.num_prompts, 512, args.seed)
    else:
        requests = w1_requests(args.num_prompts, args.seed)
    if args.request_rate is None:
        args.request_rate = float("inf")
    if args.request_rate <= 0:
        raise SystemExit("--request-rate must be > 0 (inf: all at once)")
    engine_kwargs = dict(load_format=args.load_format, dtype=args.dtype, device=args.device,
                         max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=0)
    engine_flags = ["--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device,
                    "--max-model-len", str(args.max_model_len), "--seed", "0"]
    if args.enforce_eager:
        engine_flags.append("--enforce-eager")

    proc, startup_s = None, None
    if args.base_url:
        m = re.match(r"https?://([^:/]+):(\d+)", args.base_url)
        if not m:
            raise SystemExit("--base-url must look like http://HOST:PORT")
        host, port = m.group(1), int(m.group(2))
        model_name = args.served_model_name or args.model
    else:
        proc, host, port, startup_s = start_server(args.model, engine_flags, len(requests))
        model_name = args.model
    try:
        # One short request first: the first HTTP request pays for imports and lazy set-up.
        warm = [BenchRequest(requests[0].prompt_token_ids[:8], 4)]
        asyncio.run(run_load(host, port, model_name, warm, float("inf"), None, args.logprobs, args.api_key))
        before = scrape_counters(host, port, args.api_key)
        results, duration = asyncio.run(run_load(host, port, model_name, requests, args.request_rate,
                                                 args.max_concurrency, args.logprobs, args.api_key,
                                                 args.seed))
        after = scrape_counters(host, port, args.api_key)
    finally:
        server_exit = stop_server(proc) if proc is not None else None
    serving = summarize(results, duration)
    # What the server saw during the timed run (preemptions explain a gap to the offline run).
    serving["server_counters"] = {k: after[k] - before.get(k, 0.0) for k in sorted(after)}
    offline = None
    if not (args.base_url or args.skip_offline):
        offline = run_offline(args.model, engine_kwargs, requests, args.logprobs)

    import torch

    from benchmarks.common import write_results
    from benchmarks.w1 import _git_commit

    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    res = {
        "benchmark": "serving", "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "date": datetime.date.today().isoformat(), "git_commit": _git_commit(),
        "model": args.model, "weights": f"{args.load_format} (seed 0)", "dtype": args.dtype,
        "workload": "smoke" if args.smoke else "w1", "num_prompts": len(requests),
        "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
        "max_concurrency": args.max_concurrency, "logprobs": 0 if args.logprobs else None,
        "server_startup_s": startup_s, "server_exit_code": server_exit,
        "serving": serving, "offline": offline,
    }
    write_results(args.out, "serving", res, _table(res))
    if serving["failed"]:
        sys.exit(f"{serving['failed']} requests failed: {serving['errors']}")


if __name__ == "__main__":
    main()
