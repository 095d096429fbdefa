"""Pooling through AsyncLLM (engine core in its own process) and the HTTP server: the official
``openai`` client for ``/v1/embeddings`` (base64 and float), plain HTTP for ``/classify``."""

from __future__ import annotations

import asyncio
import base64
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivllm import AsyncLLM, PoolingParams, SamplingParams
from tests.conftest import random_prompts
from tests.pooling.conftest import ENGINE_ARGS
from tests.server.helpers import ServerThread, request

EMBED_NAME, CLS_NAME = "tiny-embed", "tiny-cls"


@pytest.fixture(scope="module")
def text_embed_dir(tmp_path_factory, smollm_dir) -> str:
    """A tiny random Qwen3 embedding model with SmolLM2's tokenizer (text inputs work)."""
    from transformers import AutoModel, Qwen3Config

    torch.manual_seed(17)
    config = Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256, initializer_range=0.08)
    path = tmp_path_factory.mktemp("text-embed")
    AutoModel.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(smollm_dir) / name).exists():
            shutil.copy(Path(smollm_dir) / name, path / name)
    return str(path)


class _OwningServer(ServerThread):
    def stop(self) -> None:
        super().stop()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def embed_server(text_embed_dir):
    srv = _OwningServer(AsyncLLM(text_embed_dir, **ENGINE_ARGS), EMBED_NAME)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cls_server(classifier_dirs):
    srv = _OwningServer(AsyncLLM(classifier_dirs["qwen2"], **ENGINE_ARGS), CLS_NAME)
    yield srv
    srv.stop()


def _hf_embedding(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)


def test_openai_client_embeddings(embed_server, text_embed_dir):
    openai = pytest.importorskip("openai")
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(text_embed_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(text_embed_dir)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{embed_server.port}/v1", api_key="none")
    texts = ["Paged attention packs prompts without padding.", "hi",
             "A somewhat longer sentence, so that the prompt spans more than one block of sixteen tokens."]
    for fmt in (None, "float"):  # by default the client asks for base64 and decodes it
        kwargs = {"encoding_format": fmt} if fmt else {}
        resp = client.embeddings.create(model=EMBED_NAME, input=texts, **kwargs)
        assert [d.index for d in resp.data] == [0, 1, 2]
        ids = [tok.encode(t) for t in texts]
        assert resp.usage.prompt_tokens == sum(len(i) for i in ids)
        for d, prompt_ids in zip(resp.data, ids):
            torch.testing.assert_close(torch.tensor(d.embedding), _hf_embedding(hf, prompt_ids), atol=2e-5, rtol=0)
    prompts = random_prompts([3, 40], vocab=49152, seed=2)
    resp = client.embeddings.create(model=EMBED_NAME, input=prompts)  # token-id inputs
    for d, p in zip(resp.data, prompts):
        torch.testing.assert_close(torch.tensor(d.embedding), _hf_embedding(hf, p), atol=2e-5, rtol=0)
    # base64 asked for explicitly: little-endian float32 bytes, as OpenAI sends them.
    code, body = request(embed_server.port, "POST", "/v1/embeddings",
                         {"input": prompts, "encoding_format": "base64"})
    assert code == 200
    for d, ref in zip(body["data"], resp.data):
        values = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        assert values.tolist() == pytest.approx(ref.embedding, abs=1e-6)


def test_embeddings_errors_and_truncation(embed_server):
    port = embed_server.port
    long = random_prompts([300], vocab=49152, seed=4)[0]
    for body, status, words in (
            ({"input": []}, 400, "input"),
            ({"input": "x", "dimensions": 8}, 400, "dimensions"),
            ({"input": "x", "model": "other"}, 404, "does not exist"),
            ({"input": long}, 400, "max_model_len"),
            ({"input": [[1, 2, 10**9]]}, 400, "vocabulary"),
            ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format")):
        code, resp = request(port, "POST", "/v1/embeddings", body)
        assert code == status and words in resp["error"]["message"], (body, resp)
    code, cut = request(port, "POST", "/v1/embeddings", {"input": long, "truncate_prompt_tokens": 20})
    _, tail = request(port, "POST", "/v1/embeddings", {"input": long[-20:]})
    assert code == 200 and cut["usage"]["prompt_tokens"] == 20
    assert cut["data"][0]["embedding"] == pytest.approx(tail["data"][0]["embedding"], abs=1e-6)
    code, resp = request(port, "POST", "/classify", {"input": "x"})  # not a classifier
    assert code == 400 and "classify" in resp["error"]["message"]


def test_classify_endpoint(cls_server, hf_classifiers):
    prompts = random_prompts([1, 20, 90], seed=6)
    code, resp = request(cls_server.port, "POST", "/classify", {"model": CLS_NAME, "input": prompts})
    assert code == 200, resp
    hf = hf_classifiers["qwen2"]
    assert resp["object"] == "list" and resp["usage"]["prompt_tokens"] == 111
    for i, (d, p) in enumerate(zip(resp["data"], prompts)):
        with torch.no_grad():
            logits = hf(torch.tensor([p])).logits[0]
        assert d["index"] == i and d["num_classes"] == 3
        assert d["probs"] == pytest.approx(torch.softmax(logits, -1).tolist(), abs=2e-5)
        assert d["label"] == hf.config.id2label[int(logits.argmax())]
    code, resp = request(cls_server.port, "POST", "/v1/embeddings", {"input": [1, 2]})
    assert code == 400 and "embed" in resp["error"]["message"]


def test_async_classify_concurrent_and_cancelled(cls_server):
    engine = cls_server.engine
    a, b = random_prompts([30, 70], seed=9), random_prompts([5], seed=10)

    async def together():
        return await asyncio.gather(engine.classify(a), engine.classify(b),
                                    engine.classify(a, PoolingParams(activation=False)))

    first, second, raw = cls_server.call(together())
    alone = cls_server.call(engine.classify(a))
    for x, y in zip(first, alone):
        assert x.outputs.probs == pytest.approx(y.outputs.probs, abs=1e-6)
    assert len(second) == 1 and second[0].outputs.num_classes == 3
    assert torch.softmax(torch.tensor(raw[0].outputs.probs), -1).tolist() == pytest.approx(first[0].outputs.probs,
                                                                                           abs=1e-6)

    async def cancelled():
        task = asyncio.ensure_future(engine.classify(random_prompts([250] * 16, seed=12)))
        for _ in range(400):
            if (await engine.stats())["num_running"]:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # The abort went out before this query, and the core reads its input in order.
        return await engine.stats()

    stats = cls_server.call(cancelled())
    assert stats["num_running"] + stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0.0

    async def generate():
        async for _ in engine.generate([1, 2], SamplingParams(max_tokens=1)):
            pass

    with pytest.raises(ValueError, match="cannot generate"):
        cls_server.call(generate())
    with pytest.raises(ValueError, match="task 'embed'"):
        cls_server.call(engine.embed([[1, 2]]))
    assert cls_server.call(engine.classify([[1, 2]]))[0].outputs.num_classes == 3  # still serving
