#!/usr/bin/env bash
# Everything one GPU lease should run, in one command, with a short table printed last.
#
#   Here (once per session):  ../shared/device/wheels.sh pyzmq==27.1.0     # the image lacks pyzmq
#   On the device (run tool, carry [".whl"]):  bash benchmarks/gpu_session.sh [quick|full]
#
# quick (default): GPU tests (engine vs HF fp32, Triton vs torch, graphs vs eager, overlap vs
# sync, no Triton JIT after start-up, AsyncLLM), then W1 (benchmarks/w1.py) and W2 (w2.py).
# full: also the kernel tests in bf16 and benchmarks/kernels.py (~3 more minutes).
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
run gpu-tests python3 -m pytest -q -s tests/gpu
export MINIVLLM_GIT_COMMIT=${MINIVLLM_GIT_COMMIT:-unknown}
run w1 python3 benchmarks/throughput.py --workload w1 --out "$out"
run w2 python3 benchmarks/latency.py --workload w2 --out "$out"
if [ "$mode" = full ]; then
  run kernel-tests python3 -m pytest -q -s tests/kernels
  run kernels python3 benchmarks/kernels.py --out "$out"
fi
grep -hE "identical|logprob - HF|compilations" "$out/gpu-tests.log" || true
printf '%s\n' "| step | status | time | last line |" "|---|---|---|---|" "${summary[@]}"
