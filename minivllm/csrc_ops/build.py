"""Just-in-time build of a ``csrc/*.cu`` file into a cached shared library, loaded with ctypes.

No torch C++ headers are involved: the sources export plain ``extern "C"`` launchers taking
raw device pointers and a ``cudaStream_t``, so one ``nvcc`` call builds them in seconds. The
library lands in ``~/.cache/minivllm/csrc/<hash>/`` (``MINIVLLM_CACHE_DIR`` overrides the
root), the hash covering the source, the flags and the nvcc version, so an edit or another
GPU architecture builds afresh and everything else loads the cached file.

Every failure (no CUDA device, no nvcc, no source — e.g. an installed wheel, which does not
carry ``csrc/`` — or a compile error) is reported once as a warning and yields ``None``:
callers fall back to the Triton/torch path, never crash.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# Environment knobs (read when a library is first requested).
CSRC_DIR_ENV = "MINIVLLM_CSRC_DIR"      # where the .cu sources are (default: <repo>/csrc)
CACHE_DIR_ENV = "MINIVLLM_CACHE_DIR"    # cache root (default: ~/.cache/minivllm)
BUILD_TIMEOUT_S = 600


@dataclass(frozen=True)
class BuiltLibrary:
    """A loaded csrc library and what its build cost (0 when it came from the cache)."""
    lib: ctypes.CDLL
    path: Path
    build_s: float


def csrc_dir() -> Path:
    """The directory holding the ``.cu`` sources: ``$MINIVLLM_CSRC_DIR``, else ``csrc/`` next to
    the ``minivllm`` package (a source checkout or an editable install)."""
    env = os.environ.get(CSRC_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "csrc"


def find_nvcc() -> str | None:
    """Path of ``nvcc``: ``$CUDA_HOME``/``$CUDA_PATH``, then ``PATH``, then /usr/local/cuda."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    # /usr/local/cuda, else the newest versioned toolkit (/usr/local/cuda-13.0, ...).
    versioned = sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    for candidate in ["/usr/local/cuda/bin/nvcc", *versioned]:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def arch_flag(capability: tuple[int, int]) -> str:
    """``-arch`` for a compute capability; Hopper gets ``sm_90a`` (its full feature set)."""
    major, minor = capability
    suffix = "a" if (major, minor) == (9, 0) else ""
    return f"-arch=sm_{major}{minor}{suffix}"


def nvcc_flags(capability: tuple[int, int]) -> list[str]:
    # --split-compile=0: nvcc optimises the many template instantiations on every core.
    return ["-O3", arch_flag(capability), "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
            "--split-compile=0"]


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    return out.stdout.strip()


def _compile(nvcc: str, flags: list[str], source: Path, target: Path) -> None:
    """Build ``target`` atomically: compile to a temporary name in the same directory, then
    rename, so concurrent processes never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([nvcc, *flags, "-o", tmp, str(source)], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_root() -> Path:
    """``$MINIVLLM_CACHE_DIR``, else ``~/.cache/minivllm``, else (home not writable) a
    per-user directory under the system temp dir."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    home = Path.home() / ".cache" / "minivllm"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"minivllm-cache-{os.getuid()}"


def unavailable_reason(name: str) -> str | None:
    """Why ``name``.cu cannot be built here without trying (``None``: it may be)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME)"
    if not (csrc_dir() / f"{name}.cu").is_file():
        return f"{csrc_dir() / (name + '.cu')} not found (set {CSRC_DIR_ENV})"
    return None


@functools.cache
def load(name: str) -> BuiltLibrary | None:
    """Build (or take from the cache) and load ``csrc/<name>.cu`` for the current CUDA device.

    Returns ``None`` with a warning when that is impossible; the result is kept for the
    process, so a failing build is tried, and warned about, once.
    """
    reason = unavailable_reason(name)
    if reason is not None:
        if torch.cuda.is_available():  # without CUDA the fallback is expected: no warning
            warnings.warn(f"minivllm csrc op {name!r} unavailable: {reason}; using the Triton/torch "
                          "path", RuntimeWarning, stacklevel=2)
        return None
    nvcc = find_nvcc() or "nvcc"  # found: unavailable_reason checked
    source = csrc_dir() / f"{name}.cu"
    flags = nvcc_flags(torch.cuda.get_device_capability())
    try:
        digest = hashlib.sha256()
        digest.update(source.read_bytes())
        digest.update("\0".join(flags).encode())
        digest.update(_nvcc_version(nvcc).encode())
        target = _cache_root() / "csrc" / digest.hexdigest()[:20] / f"{name}.so"
        build_s = 0.0
        if not target.is_file():
            start = time.perf_counter()
            _compile(nvcc, flags, source, target)
            build_s = time.perf_counter() - start
        return BuiltLibrary(ctypes.CDLL(str(target)), target, build_s)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"minivllm csrc op {name!r}: build or load failed, using the Triton/torch "
                      f"path: {exc}", RuntimeWarning, stacklevel=2)
        return None
