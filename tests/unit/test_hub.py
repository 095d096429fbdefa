"""Hub repo ids through huggingface_hub, offline, against a pre-filled fake HF cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minivllm import LLM, SamplingParams
from minivllm.entrypoints import cli
from minivllm.models import hub
from minivllm.models.embedded import resolve_model_dir, resolve_tokenizer_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def fill_cache(hub_dir: Path, repo_id: str, files: dict[str, Path | str], commit: str = COMMIT,
               ref: str = "main") -> Path:
    """Lay out ``models--org--name/{refs/<ref>, snapshots/<commit>/...}`` as huggingface_hub does."""
    repo = hub_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, snapshot / name)
        else:
            (snapshot / name).write_text(content)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    hub_dir = tmp_path / "hf" / "hub"
    hub_dir.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_dir


@pytest.fixture
def tiny_repo(offline_cache, tiny_model_dirs):
    """org/tiny-llama in the cache: the tiny llama's config and safetensors weights."""
    src = Path(tiny_model_dirs["llama"])
    files = {p.name: p for p in src.iterdir() if p.suffix in (".json", ".safetensors")}
    return fill_cache(offline_cache, "org/tiny-llama", files)


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b",
                                  "meta-llama/Llama-3.1-8B", "org_x/model.v2"])
def test_repo_id_shapes_accepted(name):
    assert hub.looks_like_repo_id(name)


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "a/b/c", "/abs/path", "./rel/x", "~/models/x", "org/",
                                  "/name", "org/na me", "org/-x", "org/x.", "org/a--b", "org/a..b", ""])
def test_non_repo_ids_rejected(name):
    assert not hub.looks_like_repo_id(name)


def test_patterns_fetch_safetensors_configs_and_tokenizer_only():
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                  "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                  "pytorch_model.bin", "model.gguf", "onnx/model.onnx", "original/consolidated.00.pth",
                  "README.md", "LICENSE", ".gitattributes", "tf_model.h5", "flax_model.msgpack",
                  "modeling_custom.py"]
    got = set(filter_repo_objects(repo_files, allow_patterns=list(hub.MODEL_PATTERNS)))
    assert got == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                   "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"}
    tok = set(filter_repo_objects(repo_files, allow_patterns=list(hub.TOKENIZER_PATTERNS)))
    assert not any(f.endswith(".safetensors") for f in tok) and "tokenizer.json" in tok


def test_online_call_asks_the_hub_for_the_allowed_files_only(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    snapshot = fill_cache(tmp_path, "org/m", {"config.json": "{}"})

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve_model_dir("org/m", revision="v1.0") == snapshot
    repo_id, kw = calls[-1]
    assert repo_id == "org/m" and kw["revision"] == "v1.0" and kw["local_files_only"] is False
    assert kw["cache_dir"] == tmp_path / "home" / "hub"
    assert set(kw["allow_patterns"]) == set(hub.MODEL_PATTERNS)
    resolve_model_dir("org/m", trust_remote_code=True)
    assert "*.py" in calls[-1][1]["allow_patterns"]


def test_offline_resolution_from_the_cache(tiny_repo):
    assert resolve_model_dir("org/tiny-llama") == tiny_repo
    assert resolve_model_dir("org/tiny-llama", revision=COMMIT) == tiny_repo  # a commit hash
    with pytest.raises(ValueError, match=r"'org/tiny-llama' at revision 'v2'.*HF_HUB_OFFLINE"):
        resolve_model_dir("org/tiny-llama", revision="v2")


def test_missing_model_offline_is_a_clear_error(offline_cache):
    with pytest.raises(ValueError, match=r"'Qwen/Qwen3-0.6B' is not a local path.*HF cache.*HF_HUB_OFFLINE") as e:
        LLM("Qwen/Qwen3-0.6B", device="cpu")
    assert str(offline_cache) in str(e.value)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_tokenizer_dir("org/no-tokenizer")


def test_strings_that_are_neither_path_nor_repo_id_keep_the_old_error(offline_cache):
    for name in ("no-such-model", "./no/such/dir", "a/b/c"):
        with pytest.raises(ValueError, match="neither an existing directory"):
            resolve_model_dir(name)


def test_snapshot_without_config_is_refused(offline_cache):
    fill_cache(offline_cache, "org/empty", {"README.md": "x"})
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dir("org/empty")


def test_llm_on_a_hub_id_matches_the_local_directory(tiny_repo, tiny_model_dirs):
    prompt = [[5, 17, 301, 42, 9]]
    from_hub = LLM("org/tiny-llama", device="cpu", num_kv_blocks=16)
    local = LLM(tiny_model_dirs["llama"], device="cpu", num_kv_blocks=16)
    assert from_hub.config.model_dir == tiny_repo
    ids = from_hub.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert ids == local.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_hf_home_and_cli_generate_with_a_hub_id(tmp_path, monkeypatch, smollm_dir, capsys):
    """``minivllm generate --model org/name``: config + tokenizer from the cache under $HF_HOME."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    smol = Path(smollm_dir)
    config = json.loads((smol / "config.json").read_text())
    config.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    files = {"config.json": json.dumps(config), "tokenizer.json": smol / "tokenizer.json",
             "tokenizer_config.json": smol / "tokenizer_config.json"}
    fill_cache(tmp_path / "home" / "hub", "org/smol-dummy", files)
    rc = cli.main(["generate", "Hello", "--model", "org/smol-dummy", "--load-format", "dummy",
                   "--device", "cpu", "--no-chat", "--max-tokens", "3", "--num-kv-blocks", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # The tokenizer came from the cached snapshot: the prompt was text, tokenized there.
    assert "tokens/s, prompt 1 tokens" in captured.err, captured.err
