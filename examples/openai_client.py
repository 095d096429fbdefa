"""Talk to `minivllm serve` with nothing but the standard library (streaming chat).

    minivllm serve --port 8000 &        # in another shell
    python examples/openai_client.py --port 8000
"""

import argparse
import json
import urllib.request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prompt", default="Give me three facts about octopuses.")
    args = ap.parse_args()
    body = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": 96,
            "temperature": 0.7, "stream": True}
    req = urllib.request.Request(f"http://127.0.0.1:{args.port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        for raw in resp:  # Server-Sent Events: "data: {...}" lines, then "data: [DONE]"
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[len("data: "):])["choices"][0]["delta"]
            print(delta.get("content", ""), end="", flush=True)
    print()


if __name__ == "__main__":
    main()
