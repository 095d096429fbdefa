"""Talk to `minivllm serve` with the official OpenAI client (streaming chat, then a completion).

    pip install openai
    minivllm serve --port 8000 &        # in another shell (add --api-key KEY to require one)
    python examples/openai_client.py --port 8000
"""

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    ap.add_argument("--prompt", default="Give me three facts about octopuses.")
    args = ap.parse_args()
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key=args.api_key)
    model = client.models.list().data[0].id

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=96, temperature=0.7,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage is not None:
            print(f"\n[{chunk.usage.completion_tokens} tokens]")

    # vLLM's extra sampling fields go through extra_body; fields we do not implement get a 400.
    done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                     temperature=0, extra_body={"top_k": 20, "repetition_penalty": 1.1})
    print(repr(done.choices[0].text))


if __name__ == "__main__":
    main()
