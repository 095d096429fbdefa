"""Chat message formats and the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minivllm import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_chat_text_parts_equal_plain_string(smol_llm):
    plain = [{"role": "user", "content": "Name a colour."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    a, b = smol_llm.chat([plain, parts], GREEDY, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].text.strip()


@pytest.mark.parametrize("messages", [
    [{"role": "user"}],
    [{"role": "wizard", "content": "hi"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
])
def test_bad_chat_messages(smol_llm, messages):
    with pytest.raises(ValueError):
        smol_llm.chat(messages, GREEDY, use_tqdm=False)
    assert smol_llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_cli_generate(smol_llm):
    expected = smol_llm.chat([{"role": "user", "content": "What is 2+2?"}],
                             SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    proc = subprocess.run([sys.executable, "-m", "minivllm", "generate", "What is 2+2?", "--max-tokens", "8",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    assert expected.strip() in proc.stdout
    assert "tokens/s" in proc.stderr


def test_cli_bad_argument_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "minivllm", "generate", "hi", "--model", "/no/such/model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr
