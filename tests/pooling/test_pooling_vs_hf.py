"""Classification and embedding outputs against HF transformers (float32, CPU).

Prompts of mixed lengths (1 token to several blocks and longer than the 64-token budget, so
they are prefilled in chunks) run as one packed batch; a second run of the same prompts hits
the prefix cache and must give the same numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivllm import LLM, PoolingParams, SamplingParams
from tests.conftest import random_prompts
from tests.pooling.conftest import ENGINE_ARGS

LENGTHS = (1, 7, 16, 17, 40, 100, 150)
ATOL = 2e-5


def _hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def _hf_hidden(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).last_hidden_state[0]


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_classify_matches_hf(kind, classifier_dirs, hf_classifiers):
    # llama: overlapped scheduling (the CUDA default), pooled outputs arrive a step late.
    llm = LLM(classifier_dirs[kind], async_scheduling=kind == "llama", **ENGINE_ARGS)
    assert llm.config.task == "classify"
    hf = hf_classifiers[kind]
    prompts = random_prompts(LENGTHS, seed=3)
    raw = llm.classify(prompts, PoolingParams(activation=False), use_tqdm=False)
    for prompt, out in zip(prompts, raw):
        torch.testing.assert_close(torch.tensor(out.outputs.probs), _hf_logits(hf, prompt), atol=ATOL, rtol=0)
    # Again: now every prompt of a block or more is served partly from the prefix cache.
    probs = llm.classify(prompts, use_tqdm=False)
    assert [o.num_cached_tokens for o in probs] == [(n - 1) // 16 * 16 for n in LENGTHS]
    labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    for prompt, out in zip(prompts, probs):
        logits = _hf_logits(hf, prompt)
        expected = torch.sigmoid(logits) if len(labels) == 1 else torch.softmax(logits, -1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), expected, atol=ATOL, rtol=0)
        assert out.outputs.labels == tuple(labels)
        assert out.outputs.label == labels[int(logits.argmax())]
        assert out.prompt_token_ids == prompt
    assert llm.stats()["kv_cache_usage"] == 0.0  # no blocks held after the requests


@pytest.mark.parametrize("pooling_type", ["last", "mean"])
def test_embed_matches_hf(pooling_type, embed_llm, hf_embedder):
    assert embed_llm.config.task == "embed"
    prompts = random_prompts(LENGTHS, seed=int(pooling_type == "mean"))
    for normalize in (True, False):
        params = PoolingParams(pooling_type=pooling_type, normalize=normalize)
        outs = embed_llm.embed(prompts, params, use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            h = _hf_hidden(hf_embedder, prompt)
            expected = h[-1] if pooling_type == "last" else h.mean(0)
            if normalize:
                expected = F.normalize(expected, dim=-1)
            torch.testing.assert_close(torch.tensor(out.outputs.embedding), expected, atol=ATOL, rtol=0)
        # The second pass hits the cache for last-token pooling; mean pooling needs every
        # token's hidden state and recomputes.
        cached = [o.num_cached_tokens for o in outs]
        assert any(cached) == (pooling_type == "last" and not normalize)
    assert embed_llm.stats()["kv_cache_usage"] == 0.0


def test_prefix_hit_gives_the_same_embedding(embed_llm):
    shared = random_prompts([48], seed=11)[0]
    a = embed_llm.embed([shared + [5, 6]], use_tqdm=False)[0]
    b = embed_llm.embed([shared + [5, 6], shared + [7]], use_tqdm=False)
    assert b[0].num_cached_tokens == 48 and b[1].num_cached_tokens == 48
    torch.testing.assert_close(torch.tensor(b[0].outputs.embedding), torch.tensor(a.outputs.embedding),
                               atol=1e-6, rtol=0)


def test_truncation_and_length_limit(embed_llm):
    prompt = random_prompts([300], seed=5)[0]  # over max_model_len (256)
    with pytest.raises(ValueError, match="max_model_len"):
        embed_llm.embed([prompt], use_tqdm=False)
    out = embed_llm.embed([prompt], PoolingParams(truncate_prompt_tokens=40), use_tqdm=False)[0]
    ref = embed_llm.embed([prompt[-40:]], use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-40:]
    assert out.outputs.embedding == pytest.approx(ref.outputs.embedding, abs=1e-6)
    whole = embed_llm.embed([prompt], PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert len(whole.prompt_token_ids) == 256


def test_score_is_cosine_of_embeddings(embed_llm):
    a, b, c = random_prompts([5, 9, 30], seed=8)
    embs = [torch.tensor(o.outputs.embedding) for o in embed_llm.embed([a, b, c], use_tqdm=False)]
    one_to_many = embed_llm.score(a, [b, c], use_tqdm=False)
    pairwise = embed_llm.score([a, b], [b, c], use_tqdm=False)
    cos = lambda x, y: F.cosine_similarity(x, y, dim=0).item()
    assert [s.outputs.score for s in one_to_many] == pytest.approx([cos(embs[0], embs[1]), cos(embs[0], embs[2])],
                                                                    abs=1e-5)
    assert [s.outputs.score for s in pairwise] == pytest.approx([cos(embs[0], embs[1]), cos(embs[1], embs[2])],
                                                                 abs=1e-5)
    with pytest.raises(ValueError, match="as many"):
        embed_llm.score([a, b], [a, b, c], use_tqdm=False)


def test_wrong_task_is_a_value_error(embed_llm, classifier_dirs, tiny_model_dirs):
    with pytest.raises(ValueError, match="classify"):
        embed_llm.classify([[1, 2]], use_tqdm=False)
    with pytest.raises(ValueError, match="cannot generate"):
        embed_llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="SequenceClassification"):
        LLM(tiny_model_dirs["qwen2"], task="classify", device="cpu")
    with pytest.raises(ValueError, match="pooling_type"):
        PoolingParams(pooling_type="cls")
    # A classifier serves embeddings with task="embed" (its score head is left out).
    llm = LLM(classifier_dirs["qwen2"], task="embed", **ENGINE_ARGS)
    assert len(llm.embed([[1, 2, 3]], use_tqdm=False)[0].outputs.embedding) == 64
    # The engine stays usable after refused requests.
    assert embed_llm.embed([[1, 2, 3]], use_tqdm=False)[0].outputs.hidden_size == 64


def test_sentence_transformers_package_is_an_embedding_model(tmp_path, tiny_model_dirs):
    """A causal-LM checkpoint with a sentence-transformers ``modules.json`` (how Qwen3-Embedding
    ships) is served as an embedding model, with the pooling its ``1_Pooling`` config names."""
    import json
    import shutil

    from minivllm.config import ModelArchConfig, resolve_task
    from minivllm.pooling.frontend import default_pooling_type

    path = tmp_path / "st"
    shutil.copytree(tiny_model_dirs["qwen3"], path)
    arch = ModelArchConfig.from_dir(path)
    assert resolve_task("auto", arch, path) == "generate" and default_pooling_type(path) == "last"
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert resolve_task("auto", arch, path) == "embed" and default_pooling_type(path) == "mean"
    llm = LLM(str(path), **ENGINE_ARGS)
    assert llm.config.arch.architecture == "Qwen3Model"
    prompt = random_prompts([20], seed=21)[0]
    default = llm.embed([prompt], use_tqdm=False)[0].outputs.embedding
    mean = llm.embed([prompt], PoolingParams(pooling_type="mean"), use_tqdm=False)[0].outputs.embedding
    assert default == pytest.approx(mean, abs=1e-6)
