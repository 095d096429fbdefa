"""Offline batch generation with the embedded SmolLM2-135M-Instruct.

    python examples/offline.py
"""

from minivllm import LLM, SamplingParams


def main() -> None:
    llm = LLM()  # embedded default model; first run converts its GGUF into ~/.cache/minivllm
    questions = ["What is the capital of France?", "Write a haiku about autumn.",
                 "Give two tips for learning to code."]
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_tokens=64)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params)
    for q, out in zip(questions, outputs):
        print(f"### {q}\n{out.outputs[0].text}\n")
    print(llm.stats())


if __name__ == "__main__":
    main()
