"""``minivllm`` command line: ``minivllm generate "prompt"`` and ``minivllm serve`` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import argparse
import signal
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF dir, .gguf file, or config dir with --load-format dummy "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def _generate(args: argparse.Namespace) -> int:
    from minivllm import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              max_model_len=args.max_model_len, attention_backend=args.attention_backend,
              enforce_eager=args.enforce_eager, seed=args.seed)
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


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from minivllm import AsyncLLM
    from minivllm.entrypoints.openai.server import serve

    engine = AsyncLLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                      max_model_len=args.max_model_len, attention_backend=args.attention_backend,
                      enforce_eager=args.enforce_eager, seed=args.seed)
    name = args.served_model_name or args.model or "smollm2-135m-instruct"

    def on_sigterm(signum, frame):  # a supervisor's stop: shut down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        asyncio.run(serve(engine, name, args.host, args.port))
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivllm", description="A compact vLLM-style LLM runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    _add_engine_args(g)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: on when the model has one)")
    g.set_defaults(func=_generate)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: --model, or smollm2-135m-instruct)")
    s.set_defaults(func=_serve)
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
