#!/usr/bin/env bash
# Everything one GPU lease should run, in one command, with a short table printed last.
#
#   Here (once per session):  ../shared/device/wheels.sh pyzmq==27.1.0     # the image lacks pyzmq
#   On the device (run tool, carry [".whl"]):  bash benchmarks/gpu_session.sh [quick|full]
#
# quick (default): GPU tests (engine vs HF fp32, Triton vs torch, graphs vs eager, overlap vs
# sync, no Triton JIT after start-up, AsyncLLM, pooling, FP8 KV, quantised weights, prompt
# logprobs), then W1 (benchmarks/w1.py) and W2 (w2.py). ~8 min on an H100.
# full: also the kernel tests in bf16 and benchmarks/kernels.py (~3 more minutes).
# quant: W1 with an FP8 KV cache and W2 with fp8/int8 weights on 4B and 8B (issue 11), ~6 min.
# diag: the engine GPU tests, W2 (minivllm only) 0.6B bf16 and 4B bf16 vs fp8, the fp8 GEMV tile sweep (~6 min).
# w1pair: W1 with the auto and the FP8 KV cache in one run, kernel breakdowns in the JSON (~4 min).
# serve: the serving benchmark (W1 over HTTP) and the classification benchmark, ~4 min.
# verify: the engine GPU tests (HF fp32, graphs, compile count, the GEMV dispatch), W2 with the HF peer
#   and fp8 weights, Qwen3-8B bf16 vs fp8 (minivllm only), the kernels.py quantisation figures (~8 min).
# essential: verify's tests and kernels.py figures, W2 0.6B minivllm only (~6 min; a short lease).
# post: serving.py (0.6B) and the W2-shaped per-step profiles of Qwen3-0.6B and of Qwen3-8B bf16 vs fp8 weights (~7 min).
# csrc: the CUDA C++ ops (csrc/, JIT-built): their GPU tests and benchmarks/cuda_gemv_bench.py, ~2 min.
# The serve stack (fastapi, uvicorn, pydantic, ...) must be in .whl too: see ../shared/device/wheels.sh.
# Set MINIVLLM_GIT_COMMIT=<sha> (the tree travels without .git) for the result files.
# Full logs and JSON land in $OUT (or ./gpu-out when $OUT is unset).
set -uo pipefail
mode=${1:-quick}
out=${OUT:-gpu-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
summary=()
run() {  # run NAME CMD...: log to $out/NAME.log, remember pass/fail and the last line
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)") | $((SECONDS - start)) s | $(tail -n 1 "$out/$name.log" | cut -c1-120) |")
}
export MINIVLLM_GIT_COMMIT=${MINIVLLM_GIT_COMMIT:-unknown}
case "$mode" in
  quick|full)
    run gpu-tests python3 -m pytest -q -s tests/gpu
    run w1 python3 benchmarks/throughput.py --workload w1 --out "$out"
    run w2 python3 benchmarks/latency.py --workload w2 --out "$out"
    if [ "$mode" = full ]; then
      run kernel-tests python3 -m pytest -q -s tests/kernels
      run kernels python3 benchmarks/kernels.py --out "$out"
    fi ;;
  quant)
    run w1-auto python3 benchmarks/throughput.py --workload w1 --hf-prompts 0 --out "$out"
    run w1-kvfp8 python3 benchmarks/throughput.py --workload w1 --kv-cache-dtype fp8 --hf-prompts 0 --out "$out"
    run w2-4b python3 benchmarks/w2_quant_quick.py benchmarks/models/qwen3-4b fp8 int8
    run w2-8b python3 benchmarks/w2_quant_quick.py benchmarks/models/qwen3-8b fp8 int8 ;;
  diag)
    run gpu-tests python3 -m pytest -q -s tests/gpu/test_engine_cuda.py tests/gpu/test_fp8_kv.py
    run w2-06b python3 benchmarks/w2_quant_quick.py benchmarks/models/qwen3-0.6b
    run w2-4b python3 benchmarks/w2_quant_quick.py benchmarks/models/qwen3-4b fp8
    run gemv-quant python3 benchmarks/gemv_sweep.py quant ;;
  w1pair)
    run w1-auto python3 benchmarks/throughput.py --workload w1 --hf-prompts 0 --out "$out"
    run w1-kvfp8 python3 benchmarks/throughput.py --workload w1 --kv-cache-dtype fp8 --hf-prompts 0 --out "$out" ;;
  serve)
    run serving python3 benchmarks/serving.py --model benchmarks/models/qwen3-0.6b --dtype bfloat16 --out "$out"
    run classify python3 benchmarks/classify.py --out "$out" ;;
  verify)
    run gpu-tests timeout 200 python3 -m pytest -q -s -x tests/gpu/test_engine_cuda.py \
      tests/gpu/test_vs_hf.py tests/gpu/test_cuda_gemv.py -k "not every_variant"
    run w2 timeout 220 python3 benchmarks/latency.py --workload w2 --quantization fp8 --out "$out"
    run w2-8b timeout 120 python3 benchmarks/w2_quant_quick.py benchmarks/models/qwen3-8b fp8
    run kernels-quant timeout 150 python3 benchmarks/kernels.py --quant-only --out "$out"
    grep -hE "^\||Targets|copy BW" "$out/kernels-quant.log" 2>/dev/null | tail -40 || true
    grep -hA12 "^| model" "$out/w2.log" 2>/dev/null || true ;;
  essential)
    run gpu-tests timeout 200 python3 -m pytest -q -s -x tests/gpu/test_engine_cuda.py \
      tests/gpu/test_vs_hf.py tests/gpu/test_cuda_gemv.py -k "not every_variant"
    run kernels-quant timeout 150 python3 benchmarks/kernels.py --quant-only --out "$out"
    run w2-06b timeout 60 python3 benchmarks/w2_quant_quick.py benchmarks/models/qwen3-0.6b
    grep -hE "^\||Targets|copy BW" "$out/kernels-quant.log" 2>/dev/null | tail -40 || true ;;
  post)
    run serving timeout 300 python3 benchmarks/serving.py --model benchmarks/models/qwen3-0.6b --dtype bfloat16 --out "$out"
    run prof-06b timeout 90 python3 benchmarks/profile_step.py --model benchmarks/models/qwen3-0.6b \
      --num-prompts 1 --input-len 128 --output-len 64 --top 12
    run prof-8b-bf16 timeout 120 python3 benchmarks/profile_step.py --model benchmarks/models/qwen3-8b \
      --num-prompts 1 --input-len 128 --output-len 64 --top 12
    run prof-8b-fp8 timeout 120 python3 benchmarks/profile_step.py --model benchmarks/models/qwen3-8b \
      --num-prompts 1 --input-len 128 --output-len 64 --top 12 --quantization fp8
    grep -hE "^\||tok/s|per step" "$out/serving.log" | tail -12 || true
    cat "$out/prof-06b.log" "$out/prof-8b-bf16.log" "$out/prof-8b-fp8.log" | grep -v "^\[" | tail -50 || true ;;
  csrc)
    run csrc-tests python3 -m pytest -q -s tests/gpu/test_cuda_gemv.py
    run cuda-gemv python3 benchmarks/cuda_gemv_bench.py
    grep -hE "^\||build_s|wrote" "$out/cuda-gemv.log" 2>/dev/null || true ;;
  *) echo "unknown mode $mode (quick, full, quant, diag, w1pair, serve, verify, essential, post, csrc)" >&2; exit 2 ;;
esac
grep -hE "identical|logprob - HF|compilations|cosine error|mean \|" "$out/gpu-tests.log" 2>/dev/null || true
grep -h "^|" "$out"/w2-*.log "$out"/gemv-*.log 2>/dev/null || true
printf '%s\n' "| step | status | time | last line |" "|---|---|---|---|" "${summary[@]}"
