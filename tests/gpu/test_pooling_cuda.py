"""Pooling models on the default GPU path (bf16, Triton attention, overlapped scheduling)
against HF transformers in float32 on the same (bf16-rounded) weights. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivllm import LLM, PoolingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTHS = (1, 16, 17, 100, 700, 1500)  # the last ones span several 1024-token steps


def _save(tmp_path_factory, kind: str):
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.05)
    torch.manual_seed(0)
    if kind == "cls":
        model = AutoModelForSequenceClassification.from_config(Qwen2Config(**common, num_labels=3))
    else:
        model = AutoModel.from_config(Qwen3Config(**common, head_dim=64))
    # Both sides compute with the same (bf16-representable) weights. Parameters only: a
    # model-wide .to(bfloat16) would also round the rotary inv_freq buffer, which is not saved,
    # so the in-memory reference would use other frequencies than any loaded model (an error
    # that grows with position: 1.6e-3 of cosine at 700 tokens).
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    return str(path), model.cuda().eval()


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 4096, (n,), generator=g).tolist() for n in LENGTHS]


def test_classify_cuda_close_to_hf(tmp_path_factory):
    path, hf = _save(tmp_path_factory, "cls")
    llm = LLM(path, dtype="bfloat16", max_num_batched_tokens=1024)
    assert llm.config.async_scheduling
    prompts = _prompts()
    first = llm.classify(prompts, use_tqdm=False)
    again = llm.classify(prompts, use_tqdm=False)  # prefix-cache hits
    assert max(o.num_cached_tokens for o in again) > 0
    for p, a, b in zip(prompts, first, again):
        with torch.no_grad():
            ref = torch.softmax(hf(torch.tensor([p], device="cuda")).logits[0], -1).cpu()
        assert (torch.tensor(a.outputs.probs) - ref).abs().max() < 2e-2
        assert (torch.tensor(b.outputs.probs) - torch.tensor(a.outputs.probs)).abs().max() < 1e-2
    assert llm.stats()["kv_cache_usage"] == 0.0


@pytest.mark.parametrize("pooling_type", ["last", "mean"])
def test_embed_cuda_close_to_hf(tmp_path_factory, pooling_type):
    path, hf = _save(tmp_path_factory, "embed")
    llm = LLM(path, dtype="bfloat16", max_num_batched_tokens=1024)
    prompts = _prompts()
    outs = llm.embed(prompts, PoolingParams(pooling_type=pooling_type), use_tqdm=False)
    from transformers import AutoModel

    hf_bf16 = AutoModel.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()

    def pooled(model, p):
        with torch.no_grad():
            h = model(torch.tensor([p], device="cuda")).last_hidden_state[0].float()
        return F.normalize(h[-1] if pooling_type == "last" else h.mean(0), dim=-1).cpu()

    for p, o in zip(prompts, outs):
        ref = pooled(hf, p)
        # Cosine error against float32, next to HF's own bf16 run; a wrong pooling position or a
        # dropped chunk costs far more (cosines of unrelated random states are ~0).
        ours_err = 1 - F.cosine_similarity(torch.tensor(o.outputs.embedding), ref, dim=0).item()
        hf_err = 1 - F.cosine_similarity(pooled(hf_bf16, p), ref, dim=0).item()
        print(f"embed {pooling_type} len {len(p)}: cosine error ours {ours_err:.2e}, HF bf16 {hf_err:.2e}")
        assert ours_err <= 3 * hf_err + 2e-4, (len(p), ours_err, hf_err)
