"""``minivllm`` command line: ``minivllm generate "prompt"`` and ``minivllm serve`` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import argparse
import sys
import time

from minivllm import __version__
from minivllm.engine_args import EngineArgs
from minivllm.entrypoints.openai.settings import ServerSettings
from minivllm.entrypoints.worker import add_worker_parser


def _generate(args: argparse.Namespace) -> int:
    from minivllm import LLM, SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(engine_args.model, **engine_args.engine_kwargs())
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    chat = args.chat
    if chat is None:
        tok = llm.get_tokenizer()
        chat = tok is not None and bool(getattr(tok, "chat_template", None))
    start = time.perf_counter()
    if chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    completion = out.outputs[0]
    print(completion.text)
    n = len(completion.token_ids)
    print(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s, "
          f"prompt {len(out.prompt_token_ids)} tokens, finish_reason={completion.finish_reason}]",
          file=sys.stderr)
    return 0


def _server_settings(args: argparse.Namespace) -> ServerSettings:
    template = None
    if args.chat_template is not None:
        from pathlib import Path

        path = Path(args.chat_template)
        template = path.read_text() if path.is_file() else args.chat_template
    return ServerSettings(
        api_key=args.api_key, allowed_origins=tuple(args.allowed_origins or ()),
        max_concurrent_requests=args.max_concurrent_requests, max_n=args.max_n,
        max_prompts_per_request=args.max_prompts_per_request, max_prompt_chars=args.max_prompt_chars,
        max_request_body_bytes=args.max_request_body_bytes, max_open_connections=args.max_open_connections,
        timeout_request_read_s=args.timeout_request_read, timeout_keep_alive_s=args.timeout_keep_alive,
        shutdown_timeout_s=args.shutdown_timeout, log_stats_interval_s=args.log_stats_interval,
        access_log=not args.disable_access_log, chat_template=template)


def _raise_fd_limit(wanted: int) -> None:
    """Open connections need descriptors: lift the soft limit toward the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = min(hard, max(soft, wanted + 256)) if hard != resource.RLIM_INFINITY else max(soft, wanted + 256)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os

    from minivllm import AsyncLLM

    try:
        from minivllm.entrypoints.openai.server import serve
    except ImportError as e:
        raise ValueError(f"the server needs its extra dependencies ({e.name} is missing): "
                         "pip install 'minivllm[serve]'") from None
    if args.model_pos is not None:
        if args.model is not None and args.model != args.model_pos:
            raise ValueError("give the model once: positionally or with --model")
        args.model = args.model_pos
    settings = _server_settings(args)  # bad flags fail before the engine loads
    if os.environ.get("MINIVLLM_API_KEY") and settings.api_key is None:
        from dataclasses import replace

        settings = replace(settings, api_key=os.environ["MINIVLLM_API_KEY"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_fd_limit(settings.max_open_connections)
    engine_args = EngineArgs.from_cli_args(args)
    engine = AsyncLLM(engine_args.model, heartbeat_timeout_s=args.heartbeat_timeout,
                      **engine_args.engine_kwargs())
    name = args.served_model_name or args.model or "smollm2-135m-instruct"
    try:
        return asyncio.run(serve(engine, name, args.host, args.port, settings))
    finally:
        engine.shutdown()


def _add_serve_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="same as --model")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    s.add_argument("--heartbeat-timeout", type=float, default=60.0,
                   help="seconds without a sign of life from the engine core before /health "
                        "answers 503 (a hung core; default 60)")
    s.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: --model, or smollm2-135m-instruct)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on all but /health and /ping "
                        "(or set MINIVLLM_API_KEY)")
    s.add_argument("--allowed-origins", nargs="*", default=None, metavar="ORIGIN",
                   help="CORS: origins allowed to call the API from a browser (default: none)")
    s.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    d = ServerSettings()
    s.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="generation requests in flight; more get 429 (default %(default)s)")
    s.add_argument("--max-n", type=int, default=d.max_n, help="largest n per request (default %(default)s)")
    s.add_argument("--max-prompts-per-request", type=int, default=d.max_prompts_per_request,
                   help="largest batch of prompts in one /v1/completions request (default %(default)s)")
    s.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="longest prompt in characters, checked before tokenizing (default 32 x max_model_len)")
    s.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                   help="largest request body; more get 413 (default %(default)s)")
    s.add_argument("--max-open-connections", type=int, default=d.max_open_connections,
                   help="open client connections; more are refused with 503 (default %(default)s)")
    s.add_argument("--timeout-request-read", type=float, default=d.timeout_request_read_s, metavar="SECONDS",
                   help="a request's head and body must arrive within this (default %(default)s)")
    s.add_argument("--timeout-keep-alive", type=float, default=d.timeout_keep_alive_s, metavar="SECONDS",
                   help="idle connections are closed after this (default %(default)s)")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s, metavar="SECONDS",
                   help="on SIGTERM, in-flight requests may finish within this (default %(default)s)")
    s.add_argument("--log-stats-interval", type=float, default=d.log_stats_interval_s, metavar="SECONDS",
                   help="period of the throughput / KV-use log line (default %(default)s)")
    s.add_argument("--disable-access-log", action="store_true", help="no log line per request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivllm", description="A compact vLLM-style LLM runtime.")
    parser.add_argument("--version", action="version", version=f"minivllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    EngineArgs.add_cli_args(g)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: on when the model has one)")
    g.set_defaults(func=_generate)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    EngineArgs.add_cli_args(s)
    _add_serve_args(s)
    s.set_defaults(func=_serve)
    add_worker_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
