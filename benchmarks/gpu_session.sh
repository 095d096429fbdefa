#!/usr/bin/env bash
# Everything one GPU lease should run, in one command, with a short table printed last.
#
#   Here (once per session):  ../shared/device/wheels.sh pyzmq==27.1.0     # the image lacks pyzmq
#   On the device (run tool, carry [".whl"]):  bash benchmarks/gpu_session.sh [quick|full]
#
# quick (default): GPU tests (engine vs HF fp32, Triton vs torch, graphs vs eager, AsyncLLM) and
# the fused-layer / attention kernel tests in bf16, then the engine latency and throughput benches.
# full: also benchmarks/kernels.py (attention kernels vs copy bandwidth and SDPA; ~3 more minutes).
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
run gpu-tests python3 -m pytest -q -s tests/gpu tests/kernels
run latency python3 benchmarks/latency.py --out "$out"
run throughput python3 benchmarks/throughput.py --num-prompts 256 --input-len 256 --output-len 128 --hf-batch 64 --out "$out"
if [ "$mode" = full ]; then
  run kernels python3 benchmarks/kernels.py --out "$out"
fi
grep -hE "identical|logprob - HF" "$out/gpu-tests.log" || true
printf '%s\n' "| step | status | time | last line |" "|---|---|---|---|" "${summary[@]}"
