"""The csrc JIT build and the CUDA GEMV wrapper on a machine without CUDA (as CI runs them):
no CUDA means unavailable, bad operands raise ValueError before any build, and the build /
cache / failure paths work — exercised with a stand-in ``nvcc`` that compiles C with ``cc``.
"""

from __future__ import annotations

import ctypes
import shutil
import warnings

import pytest
import torch

from minivllm.csrc_ops import build, cuda_gemv

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_unavailable_without_cuda_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected CPU fallback must not warn
        assert build.load.__wrapped__("gemv") is None
        assert cuda_gemv.available() is False
        assert cuda_gemv.enabled() is False


def _bad_operands():
    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    x = torch.zeros(1, 64, dtype=bf)
    w = torch.zeros(32, 64, dtype=bf)
    w8 = torch.zeros(32, 64, dtype=f8)
    s = torch.ones(32)
    return [
        ("2-D", dict(x=x[None], weight=w)),
        ("1..4 rows", dict(x=torch.zeros(5, 64, dtype=bf), weight=w)),
        ("columns", dict(x=torch.zeros(1, 32, dtype=bf), weight=w)),
        ("x dtype", dict(x=x.float(), weight=w.float())),
        ("share a dtype", dict(x=x, weight=w.half())),
        ("share a dtype", dict(x=x, weight=w8)),  # 8-bit weight without its scale
        ("scale", dict(x=x, weight=w, scale=s)),  # a scale for a 16-bit weight
        ("scale", dict(x=x, weight=w8, scale=s.half())),
        ("scale", dict(x=x, weight=w8, scale=torch.ones(31))),
        ("bias", dict(x=x, weight=w, bias=torch.zeros(31, dtype=bf))),
        ("bias", dict(x=x, weight=w, bias=torch.zeros(32))),
        ("contiguous last", dict(x=torch.zeros(1, 128, dtype=bf)[:, ::2], weight=w)),
        ("16-byte", dict(x=torch.zeros(1, 40, dtype=bf), weight=torch.zeros(32, 40, dtype=f8),
                         scale=s)),  # K = 40 is not a multiple of 16 one-byte weights
        ("16-byte", dict(x=torch.zeros(1, 60, dtype=bf), weight=torch.zeros(32, 60, dtype=bf))),
        ("CUDA device", dict(x=x, weight=w)),  # well-formed, but on the CPU
        ("act", dict(x=x, weight=w, act="gelu")),
        ("columns", dict(x=x, weight=w, act="silu_and_mul")),  # silu_and_mul reads 2K columns
        ("one row", dict(x=torch.zeros(2, 128, dtype=bf), weight=w, act="silu_and_mul")),
    ]


def _bad_norm_operands():
    bf = torch.bfloat16
    x, w, nw = torch.zeros(1, 64, dtype=bf), torch.zeros(32, 64, dtype=bf), torch.ones(64, dtype=bf)
    return [
        ("one row", dict(x=torch.zeros(2, 64, dtype=bf), residual=None, norm_weight=nw, weight=w)),
        ("residual", dict(x=x, residual=torch.zeros(1, 64), norm_weight=nw, weight=w)),
        ("norm weight", dict(x=x, residual=None, norm_weight=nw[:32], weight=w)),
        ("norm weight", dict(x=x, residual=None, norm_weight=nw.float(), weight=w)),
        ("shared memory", dict(x=torch.zeros(1, 32768, dtype=bf), residual=None,
                               norm_weight=torch.ones(32768, dtype=bf),
                               weight=torch.zeros(8, 32768, dtype=bf))),
        ("CUDA device", dict(x=x, residual=None, norm_weight=nw, weight=w)),
    ]


@pytest.mark.parametrize("match,kwargs", _bad_norm_operands())
def test_bad_norm_operands_raise_value_error_without_building(monkeypatch, match, kwargs):
    monkeypatch.setattr(cuda_gemv, "_library", lambda: pytest.fail("validation must come first"))
    with pytest.raises(ValueError, match=match):
        cuda_gemv.rms_norm_gemv(eps=1e-6, **kwargs)
    assert not cuda_gemv.supports_rms_norm(**kwargs)


@pytest.mark.parametrize("match,kwargs", _bad_operands())
def test_bad_operands_raise_value_error_without_building(monkeypatch, match, kwargs):
    def no_build():
        raise AssertionError("validation must come before the build")

    monkeypatch.setattr(cuda_gemv, "_library", no_build)
    with pytest.raises(ValueError, match=match):
        cuda_gemv.gemv(**kwargs)
    assert not cuda_gemv.supports(**kwargs)


def test_arch_flags():
    assert build.arch_flag((9, 0)) == "-arch=sm_90a"
    assert build.arch_flag((8, 9)) == "-arch=sm_89"
    assert build.arch_flag((10, 0)) == "-arch=sm_100"


def _fake_cuda(monkeypatch, tmp_path, nvcc_body: str) -> None:
    """A 'CUDA machine': a device is reported, CUDA_HOME holds a stand-in nvcc, sources and
    cache live under tmp_path."""
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + nvcc_body)
    nvcc.chmod(0o755)
    (tmp_path / "src").mkdir()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv(build.CSRC_DIR_ENV, str(tmp_path / "src"))
    monkeypatch.setenv(build.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


# Builds C instead of CUDA: drops nvcc's flags, keeps "-o out" and the source (the last arg).
_CC_NVCC = """
if [ "$1" = "--version" ]; then echo "fake nvcc 1.0"; exit 0; fi
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
exec cc -shared -fPIC -x c -o "$out" "$prev"
"""


@needs_cc
def test_build_caches_by_source_and_loads(monkeypatch, tmp_path):
    _fake_cuda(monkeypatch, tmp_path, _CC_NVCC)
    src = tmp_path / "src" / "answer.cu"
    src.write_text("int answer(void) { return 42; }\n")
    first = build.load.__wrapped__("answer")
    assert first is not None and first.lib.answer() == 42 and first.build_s > 0
    again = build.load.__wrapped__("answer")  # a new process would find the same file
    assert again.path == first.path and again.build_s == 0.0
    src.write_text("int answer(void) { return 43; }\n")
    edited = build.load.__wrapped__("answer")
    assert edited.path != first.path and ctypes.CDLL(str(edited.path)).answer() == 43


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    _fake_cuda(monkeypatch, tmp_path, 'if [ "$1" = "--version" ]; then echo v; exit 0; fi\n'
                                      'echo "gemv.cu(1): error: oops" >&2; exit 2\n')
    (tmp_path / "src" / "broken.cu").write_text("this is not C++\n")
    with pytest.warns(RuntimeWarning, match="oops"):
        assert build.load.__wrapped__("broken") is None
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library left


def test_missing_source_or_nvcc_warns(monkeypatch, tmp_path):
    _fake_cuda(monkeypatch, tmp_path, "exit 1\n")
    with pytest.warns(RuntimeWarning, match="not found"):
        assert build.load.__wrapped__("nonexistent") is None
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setattr(build.os, "access", lambda *a: False)  # no /usr/local/cuda either
    (tmp_path / "src" / "gemv.cu").write_text("")
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert build.load.__wrapped__("gemv") is None


# The C ABI of csrc/gemv.cu, in C: the wrapper's ctypes plumbing without CUDA.
_FAKE_GEMV = """
static int probe_result = PROBE;
int minivllm_gemv_num_variants(void) { return 2; }
int minivllm_gemv_variant(int i, int* rows, int* threads, int* unroll) {
  if (i < 0 || i > 1) return -1;
  *rows = 2 + i; *threads = 128; *unroll = 4; return 0;
}
int minivllm_gemv(const void* x, long long sx, int a, const void* w, long long sw, int k,
                  const void* b, const float* s, void* o, long long so, int m, int n, int kk,
                  int op, const void* r, long long sr, const void* nw, void* ro, long long sro,
                  float eps, int v, int sms, int p, int pdl, void* stream) { return -1; }
int minivllm_gemv_probe(void) { return probe_result; }
const char* minivllm_cuda_error_string(int e) { return "fake driver too old"; }
"""


@pytest.fixture
def fresh_library():
    cuda_gemv._library.cache_clear()
    yield
    cuda_gemv._library.cache_clear()


@needs_cc
@pytest.mark.parametrize("probe", [0, 35])
def test_wrapper_loads_the_library_and_probes_it(monkeypatch, tmp_path, fresh_library, probe):
    _fake_cuda(monkeypatch, tmp_path, _CC_NVCC)
    (tmp_path / "src" / "gemv.cu").write_text(_FAKE_GEMV.replace("PROBE", str(probe)))
    monkeypatch.setattr(cuda_gemv, "load", build.load.__wrapped__)
    if probe == 0:
        assert cuda_gemv.available()
        assert cuda_gemv.variants() == [(2, 128, 4), (3, 128, 4)]
        assert cuda_gemv.build_seconds() > 0
    else:  # built, but the driver cannot run it: warn and fall back
        with pytest.warns(RuntimeWarning, match="fake driver too old"):
            assert not cuda_gemv.available()
        assert cuda_gemv.variants() == []
