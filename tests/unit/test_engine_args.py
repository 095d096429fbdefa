"""EngineArgs: one source for LLM / AsyncLLM keyword arguments and the CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.engine_args import EngineArgs
from minivllm.entrypoints import cli

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@pytest.fixture
def config_dir(tmp_path):
    """A model directory with only a config.json: loadable with load_format="dummy"."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(tmp_path)


def test_every_field_has_help_and_a_flag():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(EngineArgs):
        assert f.metadata["help"], f.name
        action = by_dest[f.name]
        assert f"--{f.name.replace('_', '-')}" in action.option_strings
        assert action.default == f.default


def test_cli_flags_reach_the_engine_args():
    args = cli.build_parser().parse_args([
        "serve", "org/model", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.5",
        "--max-num-batched-tokens", "64", "--block-size", "32", "--no-enable-prefix-caching",
        "-tp", "2", "--kv-cache-dtype", "fp8", "--quantization", "int8", "--task", "embed",
        "--revision", "v1", "--tokenizer", "tok/dir", "--trust-remote-code", "--max-model-len", "100",
        "--no-async-scheduling", "--served-model-name", "m", "--chat-template", "{{ x }}"])
    ea = EngineArgs.from_cli_args(args)
    assert (ea.max_num_seqs, ea.gpu_memory_utilization, ea.max_num_batched_tokens, ea.block_size) == (8, 0.5, 64, 32)
    assert ea.enable_prefix_caching is False and ea.async_scheduling is False and ea.trust_remote_code is True
    assert (ea.tensor_parallel_size, ea.kv_cache_dtype, ea.quantization, ea.task) == (2, "fp8", "int8", "embed")
    assert (ea.revision, ea.tokenizer, ea.max_model_len) == ("v1", "tok/dir", 100)
    assert args.model_pos == "org/model" and args.served_model_name == "m" and args.chat_template == "{{ x }}"
    defaults = EngineArgs.from_cli_args(cli.build_parser().parse_args(["generate", "hi"]))
    assert defaults == EngineArgs()  # the flags' defaults are the dataclass's


@pytest.mark.parametrize("argv", [["generate", "hi", "--kv-cache-dtype", "int4"],
                                  ["generate", "hi", "--max-num-seqs", "many"],
                                  ["serve", "--task", "dance"]])
def test_bad_flag_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert argv[-2] in capsys.readouterr().err


def test_version_flag(capsys):
    import minivllm

    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"minivllm {minivllm.__version__}"


def test_serve_model_given_twice_differently_is_an_error(capsys):
    assert cli.main(["serve", "a/b", "--model", "c/d"]) == 2
    assert "give the model once" in capsys.readouterr().err


@pytest.mark.parametrize("owner", ["LLM", "AsyncLLM"])
def test_unknown_keyword_names_the_argument(owner):
    import minivllm

    cls = getattr(minivllm, owner)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_num_seq'.*'max_num_seqs'"):
        cls("/no/such/dir", max_num_seq=4)
    with pytest.raises(TypeError, match="'frobnicate'"):
        cls(None, frobnicate=True)


def test_llm_signature_is_model_plus_engine_args():
    params = inspect.signature(LLM.__init__).parameters
    assert list(params)[:2] == ["self", "model"]
    assert params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("kwargs, name", [
    (dict(block_size=17), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
    (dict(trust_remote_code="yes"), "trust_remote_code"), (dict(enable_prefix_caching=None), "enable_prefix_caching"),
    (dict(revision=""), "revision"), (dict(max_model_len=10_000), "max_model_len"), (dict(seed=1.5), "seed"),
])
def test_bad_values_raise_value_error_naming_the_field(config_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineArgs(model=config_dir, load_format="dummy", device="cpu", **kwargs).create_engine_config()


def test_revision_on_a_local_path_is_refused(config_dir):
    with pytest.raises(ValueError, match="revision"):
        EngineArgs(model=config_dir, load_format="dummy", revision="main").create_engine_config()


def test_missing_safetensors_is_said_before_the_engine_starts(config_dir):
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*dummy"):
        EngineArgs(model=config_dir, device="cpu").create_engine_config()


def test_engine_config_carries_the_arguments(config_dir):
    cfg = EngineArgs(model=config_dir, load_format="dummy", device="cpu", max_num_seqs=3,
                     max_num_batched_tokens=48, block_size=32, num_kv_blocks=7,
                     enable_prefix_caching=False, max_model_len=128, seed=5).create_engine_config()
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_model_len) == (3, 48, 128)
    assert (cfg.cache.block_size, cfg.cache.num_kv_blocks, cfg.cache.enable_prefix_caching) == (32, 7, False)
    assert (cfg.seed, cfg.dtype, cfg.load_format, cfg.task) == (5, torch.float32, "dummy", "generate")
    assert cfg.tokenizer_dir is None and cfg.trust_remote_code is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_tokenizer_from_another_directory(config_dir, smollm_dir, monkeypatch):
    """A config-only model with the embedded model's tokenizer: outputs get text, and
    trust_remote_code reaches the HF tokenizer loading."""
    import transformers

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs, path=path)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    llm = LLM(config_dir, load_format="dummy", device="cpu", tokenizer=smollm_dir,
              trust_remote_code=True, num_kv_blocks=8)
    assert seen["path"] == smollm_dir and seen["trust_remote_code"] is True
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.text == llm.get_tokenizer().decode(completion.token_ids) and completion.text
    with pytest.raises(ValueError, match="no tokenizer files"):
        LLM(config_dir, load_format="dummy", device="cpu", tokenizer=config_dir)
