"""Hugging Face hub model ids (``Qwen/Qwen3-0.6B``) → a snapshot directory in the HF cache.

Resolution goes through ``huggingface_hub`` and so honours its cache (``HF_HUB_CACHE`` /
``HF_HOME``), ``HF_HUB_OFFLINE`` and ``HF_TOKEN``. Only what minivllm loads is downloaded:
safetensors weights, the JSON configs and the tokenizer files; never ``*.bin``, ``*.pt``,
``*.gguf`` or ONNX copies of the same weights. The environment is read at each call, not at
import time, so a process may set it after importing minivllm.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# JSON covers config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, vocab.json and model.safetensors.index.json.
TOKENIZER_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "*.jinja")
MODEL_PATTERNS = ("*.safetensors", *TOKENIZER_PATTERNS)
# Code shipped with a model, needed only when the user trusts it.
REMOTE_CODE_PATTERNS = ("*.py",)

# HF repo ids: "namespace/name", each part letters, digits, '-', '_', '.', at most 96 characters,
# not starting or ending with '-' or '.', and no '--' or '..' (the hub's own rules).
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")

_TRUE = ("1", "on", "yes", "true")


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub repo id (``org/name``), not like a file path."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name


def hub_cache_dir() -> Path:
    """The HF hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: only the cache is looked at."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def download_snapshot(repo_id: str, revision: str | None = None, *, tokenizer_only: bool = False,
                      trust_remote_code: bool = False) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (default ``main``),
    downloaded into the HF cache unless it is there already.

    Raises:
        ValueError: the repo, revision or (offline) cached copy does not exist, the hub cannot
            be reached, or ``huggingface_hub`` is not installed; the message says which.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise ValueError(f"model {repo_id!r} looks like a hub repo id, which needs the "
                         "huggingface_hub package: pip install huggingface_hub") from None
    patterns = list(TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS)
    if trust_remote_code:
        patterns += REMOTE_CODE_PATTERNS
    cache = hub_cache_dir()
    offline = hub_offline()
    what = "tokenizer" if tokenizer_only else "model"
    where = f"{what} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                 local_files_only=offline, allow_patterns=patterns)
    except (RevisionNotFoundError, RepositoryNotFoundError, GatedRepoError) as e:
        # RevisionNotFoundError subclasses HfHubHTTPError: caught first.
        kind = {RevisionNotFoundError: "revision not found", GatedRepoError: "gated repo: log in "
                "with `hf auth login` or set HF_TOKEN"}.get(type(e), "repo not found (or private)")
        raise ValueError(f"cannot get {where} from the hub: {kind}") from None
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x: say what is missing
            raise ValueError(f"{where}: {e}") from None
        reason = ("HF_HUB_OFFLINE is set" if offline else
                  "the hub could not be reached")
        raise ValueError(f"{where} is not a local path, and it is not in the HF cache "
                         f"({cache}) while {reason}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"cannot get {where} from the hub: {type(e).__name__}: {e}") from None
    return Path(path)
