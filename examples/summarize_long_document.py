"""Summarise a long document: the prompt is prefilled in chunks (token budget per step), and the
prefix cache makes a second question about the same document cheap.

    python examples/summarize_long_document.py [path/to/text.txt]
"""

import sys
import time

from minivllm import LLM, SamplingParams

FALLBACK = " ".join(
    f"Section {i}: The committee reviewed budget line {i}, noted a {i % 7 + 2}% change from last "
    f"year, and asked the treasurer to report back on item {i * 3} before the next meeting."
    for i in range(1, 60))


def main() -> None:
    text = open(sys.argv[1]).read() if len(sys.argv) > 1 else FALLBACK
    # A small per-step budget shows chunked prefill at work; the default (8192) is faster.
    llm = LLM(max_num_batched_tokens=1024)
    params = SamplingParams(temperature=0, max_tokens=120)
    for question in ("Summarise this document in three sentences.",
                     "What did the committee ask the treasurer to do?"):
        messages = [{"role": "user", "content": f"{text}\n\n{question}"}]
        start = time.perf_counter()
        out = llm.chat(messages, params, use_tqdm=False)[0]
        print(f"### {question}  ({len(out.prompt_token_ids)} prompt tokens, "
              f"{out.num_cached_tokens} from the prefix cache, {time.perf_counter() - start:.1f} s)")
        print(out.outputs[0].text, "\n")


if __name__ == "__main__":
    main()
