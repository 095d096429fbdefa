"""The frontend side of request isolation: an ``error`` output from the core, or a failure while
detokenizing one request, fails that request alone; the others go on."""

from __future__ import annotations

from minivllm.engine.input_processor import ProcessedPrompt, child_seed
from minivllm.engine.messages import EngineCoreOutput
from minivllm.engine.output_processor import OutputProcessor
from minivllm.sampling_params import SEED_MAX, SamplingParams


class _FlakyTokenizer:
    """Decodes ids as letters, but cannot decode id 13 (think: an id past the tokenizer's
    vocabulary in a model whose embedding table is padded)."""

    def decode(self, ids, skip_special_tokens=True):
        if 13 in ids:
            raise KeyError(13)
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _processor(tokenizer=None, **requests: SamplingParams) -> OutputProcessor:
    op = OutputProcessor(tokenizer)
    for rid, params in requests.items():
        op.add_request(rid, ProcessedPrompt(None, [1, 2, 3]), params, 0.0, "cumulative")
    return op


def test_error_output_fails_the_whole_request_and_names_the_siblings_to_abort():
    op = _processor(a=SamplingParams(n=3, max_tokens=5), b=SamplingParams(max_tokens=5))
    results, to_abort = op.process([
        EngineCoreOutput("0:a", [7]), EngineCoreOutput("1:a", [8]), EngineCoreOutput("2:a", [9]),
        EngineCoreOutput("0:b", [4])])
    assert not to_abort and all(not r.finished for r in results)
    results, to_abort = op.process([
        EngineCoreOutput("1:a", [], finish_reason="error", error="sampling failed: bad top_k"),
        EngineCoreOutput("0:b", [5])])
    failed = next(r for r in results if r.request_id == "a")
    assert failed.finished and failed.error == "sampling failed: bad top_k"
    assert [c.finish_reason for c in failed.outputs] == ["error"] * 3
    assert [c.token_ids for c in failed.outputs] == [[7], [8], [9]]  # what was made stays
    assert sorted(to_abort) == ["0:a", "2:a"]  # the failed sequence is already gone in the core
    assert not op.has_request("a")
    # Late outputs of the failed request's siblings are ignored; b goes on untouched.
    results, to_abort = op.process([EngineCoreOutput("0:a", [1]),
                                    EngineCoreOutput("0:b", [6], finish_reason="length")])
    assert [r.request_id for r in results] == ["b"]
    assert results[0].error is None and results[0].outputs[0].token_ids == [4, 5, 6]


def test_error_output_keeps_finish_reasons_of_completions_that_already_ended():
    op = _processor(a=SamplingParams(n=2, max_tokens=5))
    op.process([EngineCoreOutput("0:a", [7], finish_reason="length")])
    results, to_abort = op.process([EngineCoreOutput("1:a", [], finish_reason="error", error="x")])
    assert [c.finish_reason for c in results[0].outputs] == ["length", "error"]
    assert results[0].finished and results[0].error == "x" and to_abort == []


def test_error_without_message_still_fails_with_one():
    op = _processor(a=SamplingParams())
    results, _ = op.process([EngineCoreOutput("0:a", [], finish_reason="error")])
    assert results[0].finished and results[0].error


def test_detokenizer_failure_fails_only_its_request():
    op = _processor(_FlakyTokenizer(), a=SamplingParams(max_tokens=5), b=SamplingParams(max_tokens=5))
    results, to_abort = op.process([EngineCoreOutput("0:a", [13]), EngineCoreOutput("0:b", [2])])
    by_id = {r.request_id: r for r in results}
    assert by_id["a"].finished and by_id["a"].outputs[0].finish_reason == "error"
    assert "KeyError" in by_id["a"].error
    assert to_abort == ["0:a"]  # the core still runs it: the frontend must abort it
    assert not by_id["b"].finished and by_id["b"].outputs[0].text == "c"
    results, _ = op.process([EngineCoreOutput("0:b", [3], finish_reason="length")])
    assert results[0].outputs[0].text == "cd" and results[0].error is None


def test_child_seeds_stay_in_the_range_torch_accepts():
    assert child_seed(5, 0) == 5 and child_seed(-1, 0) == -1  # unchanged for the first
    assert child_seed(5, 2) == 5 + 2 * 1_000_003
    for i in range(128):
        assert -(2**63) <= child_seed(SEED_MAX, i) <= SEED_MAX
    assert len({child_seed(SEED_MAX, i) for i in range(128)}) == 128
