"""Streaming generation with AsyncLLM (engine core in its own process).

    python examples/streaming.py
"""

import asyncio

from minivllm import AsyncLLM, SamplingParams


async def main() -> None:
    with AsyncLLM() as engine:  # embedded SmolLM2-135M-Instruct
        messages = [{"role": "user", "content": "Write a limerick about a cat who codes."}]
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=80)
        async for out in engine.chat(messages, params, request_id="demo", output_kind="delta"):
            print(out.outputs[0].text, end="", flush=True)
        print()


if __name__ == "__main__":  # required: the engine core is started with multiprocessing "spawn"
    asyncio.run(main())
